"""``--dtype auto`` (dspark.precision.choose)."""

from __future__ import annotations

import pytest
import torch

from dspark import precision
from dspark.bench_engine import synthetic_target


def test_named_dtypes_are_taken_as_asked_and_unknown_names_refused():
    assert precision.choose("float32", "cpu")[0] is torch.float32
    assert precision.choose("bfloat16", "cpu")[0] is torch.bfloat16
    assert precision.choose("float16", "cuda")[0] is torch.float16
    with pytest.raises(ValueError, match="dtype"):
        precision.choose("fp8", "cpu")


def test_auto_is_bfloat16_on_cuda_and_float32_without_native_units(monkeypatch):
    dtype, reason = precision.choose("auto", "cuda")
    assert dtype is torch.bfloat16 and "auto" in reason
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    dtype, reason = precision.choose("auto", "cpu", target=synthetic_target(quick=True))
    assert dtype is torch.float32 and "no native bfloat16" in reason


@pytest.mark.parametrize("faster", [torch.float32, torch.bfloat16])
def test_auto_on_a_cpu_with_native_units_takes_the_measured_faster_dtype(monkeypatch, faster):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "amx_bf16", "avx512_bf16"})
    measured = []

    def cost(target, dtype, gamma, repeats):
        measured.append(dtype)
        return 1.0 if dtype is faster else 2.0

    monkeypatch.setattr(precision, "forward_cost", cost)
    dtype, reason = precision.choose("auto", "cpu", target=object())
    assert dtype is faster
    assert set(measured) == {torch.float32, torch.bfloat16}
    assert "AMX" in reason and "ms" in reason


def test_forward_cost_measures_the_dtype_asked_without_changing_the_model():
    target = synthetic_target(quick=True)
    seconds = precision.forward_cost(target, torch.bfloat16, gamma=3, repeats=2)
    assert seconds > 0
    assert next(target.parameters()).dtype is torch.float32  # measured on a copy
