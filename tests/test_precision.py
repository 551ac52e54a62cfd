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


@pytest.mark.parametrize("bf16_seconds, want", [(0.5, torch.bfloat16), (0.94, torch.bfloat16),
                                                 (0.96, torch.float32), (1.2, torch.float32)])
def test_auto_on_a_cpu_with_native_units_takes_bfloat16_only_when_clearly_faster(monkeypatch, bf16_seconds, want):
    """bfloat16 must measure at least BFLOAT16_MARGIN (5 %) faster than float32
    (1.0 s here); closer than that, float32 (exact greedy identity, and no flip
    between runs on noise)."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "amx_bf16", "avx512_bf16"})
    measured = []

    def costs(target, dtypes, gamma, repeats):
        measured.extend(dtypes)
        return {torch.float32: 1.0, torch.bfloat16: bf16_seconds}

    monkeypatch.setattr(precision, "forward_costs", costs)
    dtype, reason = precision.choose("auto", "cpu", target=object())
    assert dtype is want
    assert set(measured) == {torch.float32, torch.bfloat16}
    assert "AMX" in reason and "ms" in reason


def test_forward_costs_interleave_the_dtypes_without_changing_the_model(monkeypatch):
    target = synthetic_target(quick=True)
    order = []
    step = precision._forward_step

    def recording_step(model, dtype, gamma):
        inner = step(model, dtype, gamma)
        return lambda: order.append(dtype) or inner()

    monkeypatch.setattr(precision, "_forward_step", recording_step)
    seconds = precision.forward_costs(target, (torch.float32, torch.bfloat16), gamma=3, repeats=3)
    assert set(seconds) == {torch.float32, torch.bfloat16} and all(s > 0 for s in seconds.values())
    assert order == [torch.float32, torch.bfloat16] * 4  # a warm-up each, then each repeat times both
    assert next(target.parameters()).dtype is torch.float32  # measured on a copy
