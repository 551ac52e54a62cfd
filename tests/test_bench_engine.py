"""The synthetic drafters of ``python -m dspark bench engine``: a good, a
mediocre and a useless drafter must be what their names say, or the table's
rows would not show what they claim."""

from __future__ import annotations

import torch

from dspark.bench_engine import _prompts, fit_drafter, synthetic_drafter, synthetic_target
from dspark.engine import SamplingParams, SpeculativeEngine


def test_synthetic_drafter_qualities_are_ordered_and_lossless():
    torch.manual_seed(0)
    target = synthetic_target(quick=True)
    V, R, new = target.config.vocab_size, 4, 24
    prompts = _prompts(R, V, seed=3)
    params = [SamplingParams(temperature=0.0, max_new_tokens=new) for _ in range(R)]
    plain = [r.tokens for r in SpeculativeEngine(target, None, max_concurrency=R, max_model_len=96).generate(
        prompts, params)]
    texts = [p + t for p, t in zip(prompts, plain)]
    acceptance = {}
    for quality in ("good", "mediocre", "useless"):
        drafter = synthetic_drafter(target, block_size=8)
        fit_drafter(drafter, quality, texts, seed=1)
        engine = SpeculativeEngine(target, drafter, max_concurrency=R, max_model_len=96)
        out = [r.tokens for r in engine.generate(prompts, params)]
        assert out == plain, quality
        m = engine.metrics
        acceptance[quality] = m.accepted_drafts / max(1, sum(m.position_trials))
    assert acceptance["good"] > 0.6
    assert 0.15 < acceptance["mediocre"] < acceptance["good"] - 0.1
    assert acceptance["useless"] < 0.05
