"""Hostile arguments to the ops: each defect found by fuzzing, pinned down.

Size arguments are checked before anything is allocated from them, tensors an
op writes may not overlap themselves or the op's other arguments, empty
tensors take any strides, and every message names the argument."""

import math

import pytest
import torch

from dspark import ops, reference


def _empty_batch(R=0, V=16):
    return torch.randn(R, V), torch.zeros(0, dtype=torch.int32), torch.zeros(R + 1, dtype=torch.int32)


# ----------------------------------------------------------- rejection_sample


@pytest.mark.parametrize("value, exc", [(-2, ValueError), (-1, ValueError), (2**32, ValueError),
                                        (2**31 - 1, ValueError), (1025, ValueError), (2.0, TypeError),
                                        (True, TypeError), ("3", TypeError)])
def test_max_num_draft_is_checked_before_the_output_is_allocated(monkeypatch, value, exc):
    """max_num_draft = 2**32 used to allocate [R, 2**32 + 1] int32 (48 GiB for
    three requests) before the ValueError; -2 failed inside torch.empty."""
    target, tokens, cu = _empty_batch(R=3)
    calls = []
    real_empty = torch.empty

    def counting_empty(*args, **kwargs):
        calls.append(args)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", counting_empty)
    with pytest.raises(exc, match="max_num_draft"):
        ops.rejection_sample(target, tokens, cu, seed=0, max_num_draft=value)
    assert calls == []


def test_max_num_draft_may_pad_up_to_the_limit_or_to_the_draft_count():
    target, tokens, cu = _empty_batch(R=2)
    out = ops.rejection_sample(target, tokens, cu, seed=0, max_num_draft=ops.MAX_PADDING)
    assert out.output_tokens.shape == (2, ops.MAX_PADDING + 1) and (out.output_tokens[:, 1:] == -1).all()


def test_a_bad_cu_num_draft_is_refused_before_the_computed_width_is_allocated():
    target = torch.randn(1, 8)
    with pytest.raises(ValueError, match="cu_num_draft"):
        ops.rejection_sample(target, torch.zeros(0, dtype=torch.int32),
                             torch.tensor([0, 2**31 - 1], dtype=torch.int32), seed=0)


def test_empty_strided_views_are_accepted_at_zero_requests():
    """R = 0 is documented to return empty outputs; an empty view with a
    non-unit last stride used to be refused."""
    V = 16
    target = torch.randn(0, 2 * V)[:, ::2]
    assert target.shape == (0, V) and target.stride(-1) == 2
    draft = torch.randn(0, 3 * V)[:, ::3]
    out = ops.rejection_sample(target, torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                               draft_logits=draft, seed=0)
    assert out.output_tokens.shape == (0, 1) and out.num_accepted.shape == (0,)
    tokens = torch.empty(0, 10, dtype=torch.int32)[:, ::2]
    out = ops.rejection_sample(target, torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                               seed=0, max_num_draft=4, out=(tokens, torch.empty(0, dtype=torch.int32), None))
    assert out.output_tokens.shape == (0, 5)


def test_overlapping_outputs_are_refused():
    R, n, V = 3, 2, 8
    target = torch.randn(R * n + R, V)
    tokens = torch.randint(0, V, (R * n,), dtype=torch.int32)
    cu = torch.arange(0, R * n + 1, n, dtype=torch.int32)
    expanded = torch.empty(1, n + 1, dtype=torch.int32).expand(R, n + 1)
    with pytest.raises(ValueError, match="'output_tokens'.*stride-0"):
        ops.rejection_sample(target, tokens, cu, seed=0, max_num_draft=n,
                             out=(expanded, torch.empty(R, dtype=torch.int32), None))
    shared = torch.empty(R * (n + 1), dtype=torch.int32)
    with pytest.raises(ValueError, match="'output_tokens'.*share memory with 'num_accepted'"):
        ops.rejection_sample(target, tokens, cu, seed=0, max_num_draft=n,
                             out=(shared.view(R, n + 1), shared[:R], None))
    with pytest.raises(ValueError, match="'num_accepted'.*share memory with 'cu_num_draft'"):
        ops.rejection_sample(target, tokens, cu, seed=0, max_num_draft=n,
                             out=(torch.empty(R, n + 1, dtype=torch.int32), cu[:R], None))


# ----------------------------------------------------------------------- rope


def test_rope_refuses_an_expanded_q_that_it_would_rotate_several_times():
    """A stride-0 q used to be rotated in place once per token that maps to the
    same memory; PyTorch's in-place ops refuse such views."""
    base = torch.randn(1, 2, 8)
    q = base.expand(3, 2, 8)
    with pytest.raises(ValueError, match="'q'.*stride-0"):
        ops.rope(q, None, torch.arange(3), theta=1e4)
    assert torch.equal(base, base.clone())
    k = torch.randn(1, 1, 8).expand(3, 1, 8)
    with pytest.raises(ValueError, match="'k'.*stride-0"):
        ops.rope(torch.randn(3, 2, 8), k, torch.arange(3), theta=1e4)
    heads = torch.randn(3, 1, 8).expand(3, 4, 8)  # heads share memory
    with pytest.raises(ValueError, match="'q'"):
        ops.rope(heads, None, torch.arange(3), theta=1e4)


def test_rope_refuses_q_and_k_in_the_same_memory():
    q = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="'q'.*share memory with 'k'"):
        ops.rope(q, q, torch.arange(3), theta=1e4)
    with pytest.raises(ValueError, match="share memory"):
        ops.rope(q, q[:, :1], torch.arange(3), theta=1e4)


def test_rope_accepts_q_and_k_sliced_from_one_projection():
    T, H, Hkv, D = 4, 2, 1, 8
    fused = torch.randn(T, H + 2 * Hkv, D)
    q, k = fused[:, :H], fused[:, H:H + Hkv]
    expected_q, expected_k = q.clone(), k.clone()
    positions = torch.arange(T)
    ops.rope(expected_q, expected_k, positions, theta=1e4)
    ops.rope(q, k, positions, theta=1e4)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)


@pytest.mark.parametrize("rotary_dim, exc", [(2.5, TypeError), ("4", TypeError), (True, TypeError), (3, ValueError),
                                             (0, ValueError), (16, ValueError)])
def test_rope_rotary_dim_is_an_int(rotary_dim, exc):
    with pytest.raises(exc, match="rotary_dim"):
        ops.rope(torch.randn(2, 1, 8), None, torch.arange(2), rotary_dim=rotary_dim)


# ------------------------------------------------------ append_kv / attention


def test_append_kv_refuses_one_tensor_as_both_caches():
    cache = torch.zeros(2, 4, 1, 8)
    k = torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="'k_cache'.*share memory with 'v_cache'"):
        ops.append_kv(k, k.clone(), cache, cache, torch.arange(3))


def test_paged_attention_refuses_out_in_q():
    q = torch.randn(2, 2, 8)
    cache = torch.randn(1, 4, 1, 8)
    args = (cache, cache.clone(), torch.zeros(1, 1, dtype=torch.int32), torch.tensor([2], dtype=torch.int32),
            torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="'out'.*share memory with 'q'"):
        ops.paged_attention(q, *args, out=q)


@pytest.mark.parametrize("scale, exc", [("abc", TypeError), (None, None), (float("nan"), ValueError),
                                        (float("inf"), ValueError), (0.0, ValueError), (-1.0, ValueError),
                                        (1e39, ValueError), (10**400, ValueError), (True, TypeError)])
def test_paged_attention_scale_is_named(scale, exc):
    q = torch.randn(2, 2, 8)
    cache = torch.randn(1, 4, 1, 8)
    args = (cache, cache.clone(), torch.zeros(1, 1, dtype=torch.int32), torch.tensor([2], dtype=torch.int32),
            torch.tensor([0, 2], dtype=torch.int32))
    if exc is None:
        ops.paged_attention(q, *args, scale=scale)
        return
    with pytest.raises(exc, match="'scale'"):
        ops.paged_attention(q, *args, scale=scale)


@pytest.mark.parametrize("call", [
    lambda: ops.paged_attention(torch.randn(1, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8),
                                torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
                                torch.tensor([0, 1], dtype=torch.int32), mask=["causal"]),
    lambda: ops.markov_sample(torch.randn(1, 2, 8), torch.zeros(1, dtype=torch.int64), torch.randn(8, 2),
                              torch.randn(8, 2), head=["vanilla"], seed=0),
    lambda: ops.schedule_prefix(torch.rand(2, 3), mode={"fixed"}),
])
def test_unhashable_choices_raise_a_type_error_naming_the_argument(call):
    with pytest.raises(TypeError, match="argument '(mask|head|mode)'"):
        call()


@pytest.mark.parametrize("threshold, exc", [(float("nan"), ValueError), ("0.5", TypeError), (None, ValueError)])
def test_schedule_threshold_is_a_number(threshold, exc):
    with pytest.raises(exc, match="threshold"):
        ops.schedule_prefix(torch.rand(2, 3), mode="threshold", threshold=threshold)


def test_schedule_out_tensors_may_not_alias():
    conf = torch.rand(4, 3)
    lengths = torch.empty(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="'lengths'.*share memory with 'capacity'"):
        ops.schedule_prefix(conf, mode="fixed", out=(lengths, torch.empty(1), lengths[:1]))


# --------------------------------------------------------------------- markov


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("fill", [-math.inf, math.nan])
def test_markov_row_without_mass_reports_lse_minus_inf(temperature, fill):
    """An all -inf (or NaN) corrected row is sampled uniformly; its lse was a
    finite -2.4e38 that matched neither the row (-inf) nor the logprobs."""
    R, gamma, V, rank = 2, 3, 40, 4
    g = torch.Generator().manual_seed(0)
    U = torch.randn(R, gamma, V, generator=g)
    U[0, 1] = fill
    anchor = torch.zeros(R, dtype=torch.int64)
    w1, w2 = torch.zeros(V, rank), torch.zeros(V, rank)
    out = ops.markov_sample(U, anchor, w1, w2, temperature=temperature, seed=3)
    ref = reference.markov_sample(U, anchor, w1, w2, temperature=temperature, seed=3)
    assert out.lse[0, 1] == -math.inf and ref.lse[0, 1] == -math.inf
    if temperature > 0:
        assert out.logprobs[0, 1] == pytest.approx(-math.log(V), abs=1e-5)
    assert torch.isfinite(out.lse[0, [0, 2]]).all() and torch.isfinite(out.lse[1]).all()
    assert torch.equal(out.draft_tokens, ref.draft_tokens)
    torch.testing.assert_close(out.lse, ref.lse, atol=2e-4, rtol=0)
    # a uniform sample: over many seeds every column is drawn
    seen = {int(ops.markov_sample(U[:1], anchor[:1], w1, w2, temperature=1.0, seed=s).draft_tokens[0, 1])
            for s in range(400)}
    assert len(seen) == V


def test_markov_row_with_plus_inf_reports_lse_plus_inf():
    U = torch.randn(1, 2, 16)
    U[0, 0, 5] = math.inf
    w = torch.zeros(16, 2)
    for temperature in (1.0, 0.0):
        out = ops.markov_sample(U, torch.zeros(1, dtype=torch.int64), w, w, temperature=temperature, seed=1)
        ref = reference.markov_sample(U, torch.zeros(1, dtype=torch.int64), w, w, temperature=temperature, seed=1)
        assert out.lse[0, 0] == math.inf and ref.lse[0, 0] == math.inf and int(out.draft_tokens[0, 0]) == 5
        assert math.isfinite(float(out.lse[0, 1]))


@pytest.mark.cuda
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_markov_row_without_mass_cuda_matches_cpu(temperature):
    R, gamma, V, rank = 3, 4, 300, 8
    g = torch.Generator().manual_seed(1)
    U = torch.randn(R, gamma, V, generator=g)
    U[1, 2] = -math.inf
    U[2, 0, 7] = math.inf
    anchor = torch.zeros(R, dtype=torch.int64)
    w1, w2 = torch.randn(V, rank, generator=g) * 0.1, torch.randn(V, rank, generator=g) * 0.1
    cpu = ops.markov_sample(U, anchor, w1, w2, temperature=temperature, seed=5)
    dev = ops.markov_sample(U.cuda(), anchor.cuda(), w1.cuda(), w2.cuda(), temperature=temperature, seed=5)
    assert dev.lse[1, 2].item() == -math.inf and dev.lse[2, 0].item() == math.inf
    assert torch.equal(dev.draft_tokens.cpu(), cpu.draft_tokens)
    torch.testing.assert_close(dev.lse.cpu(), cpu.lse, atol=2e-4, rtol=0)


@pytest.mark.cuda
def test_cuda_overlapping_outputs_are_refused():
    q = torch.randn(1, 2, 8, device="cuda").expand(3, 2, 8)
    with pytest.raises(ValueError, match="stride-0"):
        ops.rope(q, None, torch.arange(3, device="cuda"), theta=1e4)


# --------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def engine_models():
    from fuzz.corpus import tiny_drafter, tiny_target

    target = tiny_target()
    return target, tiny_drafter(target)


@pytest.mark.parametrize("with_drafter", [False, True])
@pytest.mark.parametrize("prompt, params, words", [
    ([1, 2, 3], dict(max_new_tokens=2.5), "max_new_tokens must be an int"),
    ([1, 2, 3], dict(max_new_tokens=True), "max_new_tokens must be an int"),
    ([1, 2, 3], dict(temperature="0.5"), "temperature must be a finite number"),
    ([1, 2, 3], dict(temperature=None), "temperature must be a finite number"),
    ([1, 2, 3], dict(temperature=float("nan")), "temperature must be a finite number"),
    ([1, 2, 3], dict(temperature=float("inf")), "temperature must be a finite number"),
    ([1, 2, 3], dict(temperature=1e39), "temperature must be a finite number"),
    ([1, 2, 3], dict(seed=1.5), "seed must be an int"),
    ([1, 2, 3], dict(seed="7"), "seed must be an int"),
    ([1, 2, 3], dict(stop_tokens=None), "stop_tokens must be a sequence"),
    ([1, 2, 3], dict(stop_tokens="ab"), "stop_tokens must be a sequence"),
    ([1, 2, 3], dict(stop_tokens=[1.0]), "stop_tokens must hold int token ids"),
    (["a", "b"], {}, "prompt must hold int token ids"),
    ([1.0, 2.0], {}, "prompt must hold int token ids"),
    ([1, 1.7], {}, "prompt must hold int token ids, got float 1.7 at index 1"),
    ([True, 2], {}, "prompt must hold int token ids, got bool"),
    ("hello", {}, "prompt must be a sequence"),
    (None, {}, "prompt must be a sequence"),
    (7, {}, "prompt must be a sequence"),
    (torch.tensor([1.0, 2.0]), {}, "prompt must be a 1-D integer tensor"),
    (torch.tensor([[1, 2]]), {}, "prompt must be a 1-D integer tensor"),
    ([1, 2, -1], {}, "outside the vocabulary"),
    ([1, 2, 96], {}, "outside the vocabulary"),
    ([1, 2, 3], None, "sampling parameters must be a SamplingParams"),
])
def test_one_bad_request_does_not_stop_the_batch(engine_models, with_drafter, prompt, params, words):
    """A wrongly typed field used to make generate() raise for the whole batch
    (or, for a float token id, silently truncate it)."""
    from dspark.engine import SamplingParams, SpeculativeEngine

    target, drafter = engine_models
    engine = SpeculativeEngine(target, drafter if with_drafter else None, max_model_len=64, max_concurrency=4)
    good = [([5, 6, 7], SamplingParams(0.0, max_new_tokens=6)), ([9, 3], SamplingParams(0.8, seed=4, max_new_tokens=5))]
    bad_params = None if params is None else SamplingParams(**dict(dict(temperature=0.0, max_new_tokens=4), **params))
    prompts = [good[0][0], prompt, good[1][0]]
    results = engine.generate(prompts, [good[0][1], bad_params, good[1][1]])
    assert results[1].finish_reason == "error" and words in results[1].error, results[1].error
    alone = engine.generate([g[0] for g in good], [g[1] for g in good])
    assert [r.tokens for r in (results[0], results[2])] == [r.tokens for r in alone]
    assert all(r.finish_reason in ("stop", "length") for r in alone)


def test_integer_like_requests_are_accepted(engine_models):
    import numpy as np

    from dspark.engine import SamplingParams, SpeculativeEngine

    engine = SpeculativeEngine(engine_models[0], max_model_len=64)
    base = engine.generate([[5, 6, 7]], SamplingParams(0.7, seed=3, max_new_tokens=5, stop_tokens=[95]))[0]
    for prompt, params in [
        (torch.tensor([5, 6, 7]), SamplingParams(0.7, seed=3, max_new_tokens=5, stop_tokens=(95,))),
        (np.array([5, 6, 7]), SamplingParams(0.7, seed=np.int64(3), max_new_tokens=np.int32(5),
                                             stop_tokens=torch.tensor([95]))),
        ((5, 6, 7), SamplingParams(np.float32(0.7), seed=3, max_new_tokens=5, stop_tokens=range(95, 96))),
    ]:
        out = engine.generate([prompt], params)[0]
        assert out.error is None and out.tokens == base.tokens


# ------------------------------------------------------ found by the fuzz suite


def test_confidence_of_a_nan_logit_is_nan():
    """A NaN hidden state gave conf = 1 (sigmoid's flushed exp2 of NaN), which a
    scheduler reads as certainty; it is NaN now, as torch.sigmoid gives, which
    the scheduler reads as 0."""
    R, gamma, d, V, rank = 2, 3, 4, 9, 2
    hidden = torch.randn(R, gamma, d)
    hidden[0, 1, 2] = math.nan
    w1 = torch.randn(V, rank)
    args = (hidden, w1, torch.tensor([1, 2]), torch.tensor([[3, 4, 5], [6, 7, 8]]), torch.randn(1, d + rank),
            torch.randn(1))
    out = ops.confidence(*args)
    ref = reference.confidence(*args)
    assert math.isnan(out.conf[0, 1]) and math.isnan(out.survival[0, 2])
    torch.testing.assert_close(out.conf, ref[1], equal_nan=True)
    lengths = ops.schedule_prefix(out.conf, mode="threshold", threshold=1e-30).lengths
    assert lengths[0] <= 1  # the scheduler stops at the NaN


def test_draft_probs_row_below_the_fixed_point_resolution_has_no_mass():
    """The kernels normalise draft probabilities by a 2^-40 fixed-point sum; a row
    summing to 1e-16 has no mass there (p_d = 0), and the reference agrees."""
    target = torch.tensor([[0.0, 1.0], [-54.1, -17.7], [0.3, 0.1]])
    probs = torch.tensor([[0.2, 0.8], [1.45e-16, math.nan]])
    tokens, cu = torch.tensor([1, 0]), torch.tensor([0, 2], dtype=torch.int32)
    out = ops.rejection_sample(target, tokens, cu, draft_probs=probs, temperature=50.0, seed=3,
                               return_soft_acceptance=True)
    ref = reference.rejection_sample(target, tokens, cu, draft_probs=probs, temperature=50.0, seed=3,
                                     return_soft_acceptance=True)
    assert float(out.soft_acceptance[1]) == 0.0
    torch.testing.assert_close(out.soft_acceptance, ref.soft_acceptance, atol=1e-5, rtol=0)
    assert torch.equal(out.output_tokens, ref.output_tokens)
