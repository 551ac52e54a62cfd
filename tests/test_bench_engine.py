"""The synthetic drafters of ``python -m dspark bench engine``: a good, a
mediocre and a useless drafter must be what their names say, or the table's
rows would not show what they claim."""

from __future__ import annotations

import torch

from dspark.bench_engine import _prompts, fit_drafter, refit_where_parted, synthetic_drafter, synthetic_target
from dspark.engine import SamplingParams, SpeculativeEngine


def plain_setup(R: int, new: int, seed: int, max_model_len: int):
    """The quick synthetic target, R prompts, greedy parameters and plain decoding's outputs."""
    target = synthetic_target(quick=True)
    prompts = _prompts(R, target.config.vocab_size, seed=seed)
    params = [SamplingParams(temperature=0.0, max_new_tokens=new) for _ in range(R)]
    plain = [r.tokens for r in SpeculativeEngine(target, None, max_concurrency=R,
                                                 max_model_len=max_model_len).generate(prompts, params)]
    return target, prompts, params, plain


def test_synthetic_drafter_qualities_are_ordered_and_lossless():
    torch.manual_seed(0)
    R = 4
    target, prompts, params, plain = plain_setup(R, 24, seed=3, max_model_len=96)
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


def test_a_good_drafter_is_refitted_where_speculative_text_parts_from_plain():
    """Outside float32 speculative decoding can part from plain decoding's text
    at a near-tie, and a bigram of plain decoding's text knows nothing after.
    Simulated in float32: the drafter is fitted on "plain" texts whose second
    half was replaced (as if they had parted there). Fitted on those alone it
    accepts little past the first half; refitted where `fixed` parts from
    them, it is good again; a useless drafter is not refitted."""
    R, new = 2, 32
    target, prompts, params, plain = plain_setup(R, new, seed=5, max_model_len=128)
    V = target.config.vocab_size
    g = torch.Generator().manual_seed(7)
    fake = [t[:new // 2] + torch.randint(0, V - 1, (new - new // 2,), generator=g).tolist() for t in plain]
    texts = [p + t for p, t in zip(prompts, fake)]

    def acceptance(drafter) -> float:
        engine = SpeculativeEngine(target, drafter, max_concurrency=R, max_model_len=128)
        assert [r.tokens for r in engine.generate(prompts, params)] == plain
        m = engine.metrics
        return m.accepted_drafts / max(1, sum(m.position_trials))

    drafter = synthetic_drafter(target, block_size=8)
    fit_drafter(drafter, "good", texts, seed=1)
    before = acceptance(drafter)
    assert refit_where_parted(drafter, "good", target, texts, {R: prompts}, {R: fake}, new, seed=1) == R
    after = acceptance(drafter)
    assert after > 0.6 and after > before + 0.2, (before, after)
    useless = synthetic_drafter(target, block_size=8)
    fit_drafter(useless, "useless", texts)
    assert refit_where_parted(useless, "useless", target, texts, {R: prompts}, {R: fake}, new) == 0


def test_print_engine_flags_a_noisy_run(capsys):
    """The plain rows' ratios to their own bracketing runs are the noise floor:
    wider than 0.15 and the output says the run cannot settle 0.97x."""
    from dspark.bench_engine import print_engine

    def row(R, drafter, config, lo, hi):
        return {"R": R, "drafter": drafter, "config": config, "tokens_per_second": 100.0, "spread": 0.1,
                "speedup": 1.0, "speedup_range": [lo, hi], "tau": 1.0, "verified_per_round": 0.0, "rounds": 10,
                "drafting_rounds": 0, "acceptance_by_position": None, "prefix_acceptance_by_position": [],
                "same_tokens": True}

    base = {"synthetic": True, "device": "cpu", "dtype": "float32", "dtype_reason": "as asked", "cpu_isa": "avx2",
            "max_new_tokens": 8, "repeats": 5}
    print_engine(dict(base, rows=[row(1, "-", "plain decoding", 0.97, 1.04), row(4, "-", "plain decoding", 0.98, 1.02)]))
    assert "WIDE SPREAD" not in capsys.readouterr().out
    print_engine(dict(base, rows=[row(1, "-", "plain decoding", 0.87, 1.12), row(4, "-", "plain decoding", 0.98, 1.02)]))
    out = capsys.readouterr().out
    assert "WIDE SPREAD" in out and "batch 1: 0.87-1.12x" in out and "batch 4" not in out.split("WIDE SPREAD")[1]
