"""The synthetic drafters of ``python -m dspark bench engine``: a good, a
mediocre and a useless drafter must be what their names say, or the table's
rows would not show what they claim."""

from __future__ import annotations

import pytest
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


def test_goal_verdict_sign_test():
    """A row meets the goal by its median; below it, the sign test says whether
    the passes put it below beyond the run's noise (5 passes: only when all 5
    are below, p = 1/32)."""
    from dspark.bench_engine import goal_verdict, repeats_to_show_below

    assert goal_verdict([0.90, 0.97, 1.10]) == ("meets", 1.0)  # the median reaches it
    assert goal_verdict([0.95, 0.96, 0.94, 0.90, 0.96]) == ("below", 1 / 32)
    verdict, p = goal_verdict([0.95, 0.96, 0.94, 0.90, 0.99])
    assert verdict == "unclear" and p == 6 / 32
    verdict, p = goal_verdict([0.95, 0.96, 0.94, 0.98, 0.99])
    assert verdict == "unclear" and p == 16 / 32
    assert goal_verdict([0.96], goal=0.97) == ("unclear", 0.5)
    with pytest.raises(ValueError, match="no ratios"):
        goal_verdict([])
    assert repeats_to_show_below() == 5  # 2 ** -5 < 0.05 <= 2 ** -4


def test_goal_verdict_error_rates():
    """Simulated passes (seeded): with the true median ratio at the goal the
    verdict says "below" at most at the test's level (1/32 = 0.031 with 5
    passes; 20000 rows: the 99.9 % band of the rate is about +-0.004), and a
    row truly at 0.90 with a pass-to-pass spread of 0.03 is found below in at
    least 90 % of runs (exact rate 0.95)."""
    from dspark.bench_engine import goal_verdict

    gen = torch.Generator().manual_seed(5)
    at_goal = 0.97 + 0.05 * torch.randn(20000, 5, generator=gen, dtype=torch.float64)
    false_alarms = sum(goal_verdict(row.tolist())[0] == "below" for row in at_goal) / len(at_goal)
    assert false_alarms < 1 / 32 + 0.006, false_alarms
    short = 0.90 + 0.03 * torch.randn(2000, 5, generator=gen, dtype=torch.float64)
    power = sum(goal_verdict(row.tolist())[0] == "below" for row in short) / len(short)
    assert power > 0.90, power


def test_print_engine_states_the_goal(capsys):
    """The hardware-aware rows' verdict line: rows meeting 0.97x by the median
    are counted, each other row is named with its passes below and p."""
    from dspark.bench_engine import print_engine

    def row(R, drafter, config, passes):
        med = sorted(passes)[len(passes) // 2]
        return {"R": R, "drafter": drafter, "config": config, "tokens_per_second": 100.0, "spread": 0.1,
                "speedup": med, "speedup_range": [min(passes), max(passes)], "speedup_passes": passes, "tau": 1.0,
                "verified_per_round": 0.0, "rounds": 10, "drafting_rounds": 0, "acceptance_by_position": None,
                "prefix_acceptance_by_position": [], "same_tokens": True}

    base = {"synthetic": True, "device": "cpu", "dtype": "float32", "dtype_reason": "as asked", "cpu_isa": "avx2",
            "max_new_tokens": 8, "repeats": 5}
    rows = [row(1, "-", "plain decoding", [1.0] * 5),
            row(1, "good", "hardware-aware", [1.5, 1.6, 1.4, 1.5, 1.5]),
            row(1, "good", "fixed(gamma)", [0.5] * 5),  # not the goal's configuration
            row(4, "useless", "hardware-aware", [0.96, 0.95, 0.99, 0.94, 0.96]),
            row(16, "useless", "hardware-aware", [0.90, 0.91, 0.92, 0.90, 0.93])]
    print_engine(dict(base, rows=rows))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("goal hardware-aware"))
    assert "1 of 3 rows meet it by the median" in line
    assert "batch 4 useless 0.9600x (4 of 5 passes below, sign test p = 0.188: not beyond this run's noise)" in line
    assert "batch 16 useless 0.9100x (5 of 5 passes below, sign test p = 0.031: below it beyond this run's noise)" in line
    assert "batch 1 " not in line
