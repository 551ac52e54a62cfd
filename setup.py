"""Builds dspark._C through CMake (see CMakeLists.txt).

Environment: DSPARK_CUDA=auto|on|off, DSPARK_CUDA_ARCHS (e.g. "90" or "80;90"),
CMAKE_BUILD_PARALLEL_LEVEL (default: all cores).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _tool(module: str, attr: str, name: str) -> str:
    """The cmake / ninja binary of the build environment, else the one on PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"dspark: '{name}' is needed to build the extension")
    return found


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        lib_dir = build_dir / "python-module"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'BIN_DIR', 'ninja')}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DDSPARK_BUILD_PYTHON=ON",
            "-DDSPARK_BUILD_TESTS=OFF",
            "-DDSPARK_BUILD_BENCHMARKS=off",
            f"-DDSPARK_PYTHON_OUTPUT_DIR={lib_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True, env=env)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "_C"], check=True, env=env)
        built = sorted(lib_dir.glob("_C*.so")) + sorted(lib_dir.glob("_C*.pyd"))
        if not built:
            raise RuntimeError(f"dspark: CMake did not produce the module in {lib_dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)


setup(ext_modules=[CMakeExtension("dspark._C")], cmdclass={"build_ext": CMakeBuild})
