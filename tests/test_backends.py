"""dspark.backends(): what was compiled, what can run, and why CUDA cannot
when it cannot (no driver, a driver older than the build's runtime, no
device)."""

import pytest

import dspark
from dspark._ext import C


def test_backends_report():
    info = dspark.backends()
    assert info["cpu"]["compiled"] and info["cpu"]["usable"] and info["cpu"]["threads"] >= 1
    cuda = info["cuda"]
    assert isinstance(cuda["compiled"], bool)
    if cuda["compiled"]:
        assert cuda["archs"], "a CUDA build lists its architectures"
        assert cuda["runtime_version"]
    if not cuda["usable"]:
        assert cuda["reason"]
    assert cuda["usable"] == (cuda["compiled"] and cuda["devices"] > 0)


def test_reason_names_a_missing_driver():
    cuda = dspark.backends()["cuda"]
    if not cuda["compiled"] or cuda["driver_version"] is not None:
        pytest.skip("this machine has a CUDA driver (or the build has no CUDA)")
    assert cuda["reason"].startswith("no NVIDIA driver: libcuda.so.1 was not found")
    assert f"a CUDA {cuda['runtime_version'].split('.')[0]} build needs a driver" in cuda["reason"]


@pytest.mark.parametrize("driver,runtime,words", [
    (0, 13000, "no NVIDIA driver: libcuda.so.1 was not found; a CUDA 13 build needs a driver for CUDA 13.0 or "
               "newer (Linux driver >= 580.65.06)"),
    (12040, 13000, "the NVIDIA driver supports CUDA 12.4, older than this build's CUDA 13.0 runtime: a CUDA 13 "
                   "build needs a driver for CUDA 13.0 or newer (Linux driver >= 580.65.06)"),
    (11080, 12040, "the NVIDIA driver supports CUDA 11.8, older than this build's CUDA 12.4 runtime: a CUDA 12 "
                   "build needs a driver for CUDA 12.0 or newer (Linux driver >= 525.60.13)"),
])
def test_driver_problems(driver, runtime, words):
    assert C.cuda_driver_problem(driver, runtime) == words


@pytest.mark.parametrize("driver,runtime", [(13000, 13000), (13020, 13000), (12020, 12080), (13000, 12040)])
def test_drivers_that_run_the_build(driver, runtime):
    """Minor-version compatibility: a runtime of major M runs on any driver for
    CUDA M.0 or newer, older minors included."""
    assert C.cuda_driver_problem(driver, runtime) == ""


def test_cli_shortens_openmp_spinning_unless_the_user_set_it(tmp_path):
    """`python -m dspark` sets GOMP_SPINCOUNT=3000 before torch loads, unless
    GOMP_SPINCOUNT or OMP_WAIT_POLICY is set; `import dspark` changes nothing."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}

    def info(extra):
        out = subprocess.run([sys.executable, "-m", "dspark", "info"], env={**env, **extra}, capture_output=True,
                             text=True, check=True, cwd=tmp_path).stdout
        return json.loads(out)["openmp_env"]

    assert info({})["GOMP_SPINCOUNT"] == "3000"
    assert info({"GOMP_SPINCOUNT": "100000"})["GOMP_SPINCOUNT"] == "100000"
    got = info({"OMP_WAIT_POLICY": "ACTIVE"})
    assert got["GOMP_SPINCOUNT"] is None and got["OMP_WAIT_POLICY"] == "ACTIVE"
    code = "import os, dspark; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    assert out.strip() == "None"
