"""rejection_sample on the CPU backend: agreement with the PyTorch reference,
determinism, batch invariance, the defined behaviour of unusual inputs, bad
inputs, and torch.library integration."""

import math

import pytest
import torch

import dspark
from dspark import ops, reference
from rejection_cases import assert_matches_reference, random_batch, sub_vocab_batch
from stats import assert_fits

MODES = ("onehot", "logits", "probs")


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 0.6, 1.0, 1.8])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 2048, 2049, 4099])
def test_matches_reference_small_vocab(mode, temperature, vocab):
    b = random_batch(24, vocab, 6, seed=vocab * 31 + int(temperature * 10))
    kw = b.kwargs(mode)
    out = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temperature,
                               seed=99, offset=3, return_soft_acceptance=True, **kw)
    ref = reference.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temperature,
                                     seed=99, offset=3, return_soft_acceptance=True, return_margins=True, **kw)
    assert_matches_reference(out, ref, f"{mode} T={temperature} V={vocab}")
    torch.testing.assert_close(out.soft_acceptance, ref.soft_acceptance, atol=2e-6, rtol=0)
    assert out.output_tokens.dtype == torch.int32 and out.num_accepted.dtype == torch.int32
    # -1 after the committed tokens, and the accepted prefix is the drafts.
    for r in range(out.num_accepted.numel()):
        a = int(out.num_accepted[r])
        begin = int(b.cu_num_draft[r])
        assert out.output_tokens[r, :a].tolist() == b.draft_tokens[begin:begin + a].tolist()
        assert 0 <= int(out.output_tokens[r, a]) < vocab
        assert (out.output_tokens[r, a + 1:] == -1).all()


@pytest.mark.parametrize("vocab", [32000, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["logits", "probs", "onehot"])
def test_matches_reference_large_vocab(vocab, dtype, mode):
    b = random_batch(6, vocab, 4, seed=vocab % 1000 + 7, dtype=dtype, spread=2.0, agreement=0.5,
                     token_dtype=torch.int32)
    kw = b.kwargs(mode)
    temps = torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 0.5])
    out = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temps,
                               seed=2024, return_soft_acceptance=True, **kw)
    ref = reference.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temps,
                                     seed=2024, return_soft_acceptance=True, return_margins=True, **kw)
    assert_matches_reference(out, ref, f"V={vocab} {dtype} {mode}")
    torch.testing.assert_close(out.soft_acceptance, ref.soft_acceptance, atol=5e-6, rtol=0)


@pytest.mark.parametrize("mode", ["logits", "probs"])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("vocab,draft_vocab", [(50, 7), (4099, 1000), (6000, 2500), (300, 300)])
def test_matches_reference_with_a_draft_vocabulary(mode, temperature, vocab, draft_vocab):
    """Draft rows over V_d of the V target ids (2500: more than one draft chunk;
    300 of 300: a permutation), draft tokens partly outside the map."""
    b = sub_vocab_batch(24, vocab, draft_vocab, 6, seed=vocab + draft_vocab + int(temperature * 10))
    kw = b.kwargs(mode)
    out = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temperature,
                               seed=5, offset=2, return_soft_acceptance=True, **kw)
    ref = reference.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temperature,
                                     seed=5, offset=2, return_soft_acceptance=True, return_margins=True, **kw)
    assert_matches_reference(out, ref, f"V_d={draft_vocab} {mode} T={temperature}")
    torch.testing.assert_close(out.soft_acceptance, ref.soft_acceptance, atol=2e-6, rtol=0)


@pytest.mark.parametrize("mode", ["logits", "probs", "onehot"])
def test_extra_outputs_do_not_change_the_committed_tokens(mode):
    """The CPU backend skips work a greedy request's tokens do not read (its
    draft rows' statistics without soft labels, its target rows' sums without
    log-probabilities): greedy and sampled requests in one batch commit the
    same tokens with and without those outputs, and the log-probabilities of
    the greedy requests equal the reference's."""
    b = sub_vocab_batch(12, 4099, 1000, 6, seed=41, agreement=0.7)
    kw = b.kwargs(mode) if mode != "onehot" else {}
    temps = torch.tensor([0.0, 1.0, 0.0, 0.7] * 3)
    cu = b.cu_num_draft.tolist()
    for r in range(0, 12, 2):  # the greedy requests' first drafts are the target's argmax: accepted
        for k in range(min(2, cu[r + 1] - cu[r])):
            b.draft_tokens[cu[r] + k] = b.target_logits[cu[r] + r + k].argmax()
    plain = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temps, seed=8, **kw)
    full = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temps, seed=8,
                                return_soft_acceptance=True, return_logprobs=True, **kw)
    assert torch.equal(plain.output_tokens, full.output_tokens)
    assert torch.equal(plain.num_accepted, full.num_accepted)
    ref = reference.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temps, seed=8,
                                     return_soft_acceptance=True, return_logprobs=True, **kw)
    greedy = temps == 0
    committed = full.output_tokens[greedy] >= 0
    assert (full.num_accepted[greedy] >= 1).sum() >= 4  # greedy drafts were accepted
    torch.testing.assert_close(full.logprobs[greedy][committed], ref.logprobs[greedy][committed], atol=2e-5,
                               rtol=1e-5)
    torch.testing.assert_close(full.soft_acceptance, ref.soft_acceptance, atol=2e-6, rtol=0)


def test_draft_vocabulary_equals_the_full_vocabulary_with_zero_outside():
    """A draft vocabulary gives the same committed tokens as the full-vocabulary
    call whose draft probabilities are 0 outside the map (draft_probs mode,
    where that full tensor can be written)."""
    b = sub_vocab_batch(32, 500, 60, 5, seed=3)
    full = torch.zeros(b.draft_probs.shape[0], 500)
    full[:, b.draft_vocab.long()] = b.draft_probs
    for T in (1.0, 0.6):
        sub = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_probs=b.draft_probs,
                                   draft_vocab=b.draft_vocab, temperature=T, seed=9, return_soft_acceptance=True)
        whole = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_probs=full,
                                     temperature=T, seed=9, return_soft_acceptance=True)
        assert torch.equal(sub.output_tokens, whole.output_tokens) and torch.equal(sub.num_accepted, whole.num_accepted)
        assert torch.equal(sub.soft_acceptance, whole.soft_acceptance)


@pytest.mark.parametrize("vocab_map,exc,words", [
    (torch.tensor([1, 2, 2], dtype=torch.int32), ValueError, "token id 2 twice"),
    (torch.tensor([1, 2, 60], dtype=torch.int32), ValueError, "outside the vocabulary"),
    (torch.tensor([1, 2, -1], dtype=torch.int32), ValueError, "outside the vocabulary"),
    (torch.tensor([1.0, 2.0, 3.0]), TypeError, "'draft_vocab' must be int32 or int64"),
    (torch.tensor([[1, 2, 3]], dtype=torch.int32), ValueError, "'draft_vocab' must be 1-D"),
    (torch.tensor([1, 2], dtype=torch.int32), ValueError, "draft_logits' must have shape \\[N_draft, V_d\\]"),
])
def test_bad_draft_vocabulary(vocab_map, exc, words):
    b = sub_vocab_batch(4, 50, 3, 3, seed=1)
    with pytest.raises(exc, match=words):
        ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                             draft_vocab=vocab_map)
    with pytest.raises(ValueError, match="'draft_vocab' needs 'draft_logits' or 'draft_probs'"):
        ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_vocab=b.draft_vocab)


def test_soft_acceptance_is_one_minus_total_variation():
    b = random_batch(8, 300, 5, seed=5)
    out = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                               temperature=0.8, seed=1, return_soft_acceptance=True)
    for r in range(8):
        for j in range(int(b.cu_num_draft[r]), int(b.cu_num_draft[r + 1])):
            pt = torch.softmax(b.target_logits[j + r].double() / 0.8, -1)
            pd = torch.softmax(b.draft_logits[j].double() / 0.8, -1)
            assert float(out.soft_acceptance[j]) == pytest.approx(1 - 0.5 * float((pt - pd).abs().sum()), abs=2e-6)


# ------------------------------------------------ determinism and invariance


def test_deterministic_for_fixed_seed_and_sensitive_to_seed_and_offset():
    b = random_batch(64, 500, 5, seed=1)
    kw = dict(draft_logits=b.draft_logits, temperature=1.0)
    a1 = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, seed=5, offset=1, **kw)
    a2 = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, seed=5, offset=1, **kw)
    assert torch.equal(a1.output_tokens, a2.output_tokens)
    other_seed = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, seed=6, offset=1, **kw)
    other_offset = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, seed=5, offset=2, **kw)
    assert not torch.equal(a1.output_tokens, other_seed.output_tokens)
    assert not torch.equal(a1.output_tokens, other_offset.output_tokens)


def test_generator_reproducible():
    b = random_batch(32, 300, 4, seed=2)
    g1 = torch.Generator().manual_seed(123)
    g2 = torch.Generator().manual_seed(123)
    o1 = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, generator=g1)
    o2 = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, generator=g2)
    o3 = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, generator=g1)  # advanced
    assert torch.equal(o1.output_tokens, o2.output_tokens)
    assert not torch.equal(o1.output_tokens, o3.output_tokens)


def _request(b, r):
    begin, end = int(b.cu_num_draft[r]), int(b.cu_num_draft[r + 1])
    return (b.target_logits[begin + r:end + r + 1], b.draft_tokens[begin:end], b.draft_logits[begin:end], end - begin)


@pytest.mark.parametrize("mode", MODES)
def test_batch_invariance_with_per_request_seeds(mode):
    """With per-request seeds a request's result is the same alone, in the
    batch, and in a permuted batch."""
    R = 12
    b = random_batch(R, 700, 5, seed=3)
    seeds = torch.randint(0, 2**62, (R,), generator=torch.Generator().manual_seed(4))
    temps = torch.linspace(0.0, 1.5, R)
    kw = b.kwargs(mode)
    full = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temps, seed=seeds,
                                max_num_draft=5, **kw)
    perm = torch.randperm(R, generator=torch.Generator().manual_seed(5)).tolist()
    parts = [_request(b, r) for r in perm]
    cu = torch.zeros(R + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([p[3] for p in parts]), 0).to(torch.int32)
    pkw = {}
    if mode == "logits":
        pkw["draft_logits"] = torch.cat([p[2] for p in parts])
    elif mode == "probs":
        pkw["draft_probs"] = torch.softmax(torch.cat([p[2] for p in parts]), -1)
        kw = {"draft_probs": torch.softmax(b.draft_logits, -1)}
        full = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temps,
                                    seed=seeds, max_num_draft=5, **kw)
    permuted = ops.rejection_sample(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), cu,
                                    temperature=temps[perm], seed=seeds[perm], max_num_draft=5, **pkw)
    for i, r in enumerate(perm):
        assert torch.equal(permuted.output_tokens[i], full.output_tokens[r])
        t, d, dl, n = _request(b, r)
        alone_kw = {"draft_logits": dl} if mode == "logits" else (
            {"draft_probs": torch.softmax(dl, -1)} if mode == "probs" else {})
        alone = ops.rejection_sample(t, d, torch.tensor([0, n], dtype=torch.int32), temperature=temps[r:r + 1],
                                     seed=seeds[r:r + 1], max_num_draft=5, **alone_kw)
        assert torch.equal(alone.output_tokens[0], full.output_tokens[r])


def test_num_threads_does_not_change_results():
    b = random_batch(40, 5000, 6, seed=8)
    before = dspark.num_threads()
    try:
        dspark.set_num_threads(1)
        one = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                                   seed=3, return_soft_acceptance=True)
        dspark.set_num_threads(3)
        three = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                                     seed=3, return_soft_acceptance=True)
    finally:
        dspark.set_num_threads(before)
    assert torch.equal(one.output_tokens, three.output_tokens)
    assert torch.equal(one.soft_acceptance, three.soft_acceptance)  # bit-identical


# -------------------------------------------------------- defined behaviour


def _single(target_rows, tokens=(), **kw):
    t = torch.as_tensor(target_rows, dtype=torch.float32)
    d = torch.as_tensor(list(tokens), dtype=torch.int64)
    cu = torch.tensor([0, len(tokens)], dtype=torch.int32)
    return ops.rejection_sample(t.reshape(len(tokens) + 1, -1), d, cu, **kw)


def _bonus_samples(row, trials=200000, temperature=1.0):
    """Bonus tokens of a request with no drafts, over many seeds at once."""
    R = trials
    t = torch.as_tensor(row, dtype=torch.float32).reshape(1, -1).expand(R, -1)
    cu = torch.zeros(R + 1, dtype=torch.int32)
    out = ops.rejection_sample(t, torch.zeros(0, dtype=torch.int64), cu, temperature=temperature, seed=17)
    return out.output_tokens[:, 0]


def test_nan_and_neg_inf_logits_are_never_sampled():
    row = [0.0, float("nan"), 1.0, float("-inf"), 0.5]
    tokens = _bonus_samples(row)
    assert not ((tokens == 1) | (tokens == 3)).any()
    p = torch.softmax(torch.tensor([0.0, -math.inf, 1.0, -math.inf, 0.5], dtype=torch.float64), -1)
    assert_fits(tokens, p, "nan/-inf row")


def test_row_without_finite_logits_is_uniform():
    tokens = _bonus_samples([float("nan"), float("-inf"), float("nan"), float("-inf")])
    assert_fits(tokens, torch.full((4,), 0.25, dtype=torch.float64), "all non-finite row")


def test_pos_inf_logits_share_the_mass():
    tokens = _bonus_samples([3.0, float("inf"), 100.0, float("inf")])
    assert set(tokens.unique().tolist()) == {1, 3}
    assert_fits(tokens, torch.tensor([0.0, 0.5, 0.0, 0.5], dtype=torch.float64), "+inf row")


def test_greedy_uses_raw_argmax_with_first_index_ties_and_nan_as_lowest():
    out = _single([[1.0, float("nan"), 5.0, 5.0], [0.0, 0.0, 0.0, 9.0]], tokens=[2], temperature=0.0)
    assert out.output_tokens.tolist() == [[2, 3]]
    out = _single([[1.0, float("nan"), 5.0, 5.0], [0.0, 0.0, 0.0, 9.0]], tokens=[3], temperature=0.0)
    assert out.output_tokens.tolist() == [[2, -1]]


@pytest.mark.parametrize("target_dtype,draft_dtype,mode", [
    (torch.bfloat16, torch.float32, "logits"),
    (torch.float32, torch.float16, "logits"),
    (torch.bfloat16, torch.float16, "probs"),
    (torch.float16, torch.float32, "probs"),
])
def test_mixed_target_and_draft_dtypes(target_dtype, draft_dtype, mode):
    b = random_batch(20, 3001, 5, seed=77, spread=2.0)
    kw = {"draft_logits": b.draft_logits.to(draft_dtype)} if mode == "logits" else \
        {"draft_probs": b.draft_probs.to(draft_dtype)}
    target = b.target_logits.to(target_dtype)
    out = ops.rejection_sample(target, b.draft_tokens, b.cu_num_draft, temperature=0.8, seed=4,
                               return_soft_acceptance=True, **kw)
    ref = reference.rejection_sample(target, b.draft_tokens, b.cu_num_draft, temperature=0.8, seed=4,
                                     return_soft_acceptance=True, return_margins=True, **kw)
    assert_matches_reference(out, ref, f"{target_dtype}/{draft_dtype}")
    torch.testing.assert_close(out.soft_acceptance, ref.soft_acceptance, atol=2e-6, rtol=0)


def test_subnormal_logits_are_read_exactly_even_with_flush_denormal():
    """The CPU backend computes with IEEE subnormals (as CUDA does), also when
    the caller turned flush-to-zero on: 1e-40 > 0 decides a greedy argmax."""
    target = torch.tensor([[0.0, 1e-40, 0.0, -1e-41]])
    no_drafts = (torch.zeros(0, dtype=torch.int64), torch.zeros(2, dtype=torch.int32))
    assert ops.rejection_sample(target, *no_drafts, temperature=0.0).output_tokens.tolist() == [[1]]
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        flushed = ops.rejection_sample(target, *no_drafts, temperature=0.0)
    finally:
        torch.set_flush_denormal(False)
    assert flushed.output_tokens.tolist() == [[1]]


def test_vocabulary_limit():
    """Normalisers are 64-bit fixed-point sums: the vocabulary must stay below 2^24."""
    no_drafts = (torch.zeros(0, dtype=torch.int64), torch.zeros(2, dtype=torch.int32))
    V = 1 << 24
    with pytest.raises(ValueError, match="vocabulary"):
        ops.rejection_sample(torch.zeros(1, V), *no_drafts)
    ok = ops.rejection_sample(torch.zeros(1, V - 1), *no_drafts, seed=3)
    assert 0 <= int(ok.output_tokens[0, 0]) < V - 1


def test_draft_probs_are_clamped_and_normalised():
    """NaN and negative draft probabilities count as 0, values above 1 (and
    +inf) as 1, and each row is normalised: [nan, 0.5, inf, -1] is
    p_d = [0, 1/3, 2/3, 0]. Token 1 (p_t = 1/2) is then accepted with
    probability min(1, (1/2) / (1/3)) = 1, token 2 (p_t = 1/4) with 3/8."""
    R = 240000
    target = torch.log(torch.tensor([[0.25, 0.5, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])).repeat(R, 1)
    probs = torch.tensor([[float("nan"), 0.5, float("inf"), -1.0]]).repeat(R, 1)
    cu = torch.arange(R + 1, dtype=torch.int32)
    ones = torch.ones(R, dtype=torch.int64)
    out = ops.rejection_sample(target, ones, cu, draft_probs=probs, seed=2, return_soft_acceptance=True)
    assert (out.num_accepted == 1).all()
    # soft acceptance = sum min(p_t, p_d) = 0 + 1/3 + 1/4 + 0
    assert float(out.soft_acceptance[0]) == pytest.approx(7 / 12, abs=1e-6)
    out = ops.rejection_sample(target, 2 * ones, cu, draft_probs=probs, seed=2)
    accepted = out.num_accepted.long()
    assert_fits(accepted, torch.tensor([5 / 8, 3 / 8], dtype=torch.float64), "accept token 2")
    # residual max(0, p_t - p_d) = [1/4, 1/6, 0, 0] -> corrections 0 or 1 in ratio 3 : 2
    corrections = out.output_tokens[accepted == 0, 0].long()
    assert_fits(corrections, torch.tensor([0.6, 0.4, 0.0, 0.0], dtype=torch.float64), "residual")


def test_draft_token_with_zero_draft_probability():
    """p_d(x) = 0: accepted iff p_t(x) > 0."""
    R = 500
    target = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]).repeat(R, 1)
    probs = torch.tensor([[0.5, 0.0, 0.5]]).repeat(R, 1)
    cu = torch.arange(R + 1, dtype=torch.int32)
    x = torch.ones(R, dtype=torch.int64)
    out = ops.rejection_sample(target, x, cu, draft_probs=probs, seed=1)
    assert (out.num_accepted == 1).all()
    target[0::2, 1] = float("-inf")  # now p_t(x) = 0 as well
    out = ops.rejection_sample(target, x, cu, draft_probs=probs, seed=1)
    assert (out.num_accepted == 0).all()
    assert (out.output_tokens[:, 0] != 1).all()


def test_residual_without_mass_samples_from_target():
    """p_t = p_d everywhere and a token both give probability 0: it is
    rejected, the residual has no mass, and the correction follows p_t."""
    R = 240000
    row = torch.tensor([0.3, float("-inf"), 1.1, -0.4])
    target = row.repeat(2 * R, 1)  # draft row + bonus row per request
    draft = row.repeat(R, 1)
    cu = torch.arange(R + 1, dtype=torch.int32)
    x = torch.ones(R, dtype=torch.int64)
    out = ops.rejection_sample(target, x, cu, draft_logits=draft, seed=4)
    assert (out.num_accepted == 0).all()
    p = torch.softmax(row.double(), -1)
    assert_fits(out.output_tokens[:, 0].long(), p, "residual without mass")


def test_empty_batch_and_no_drafts():
    empty = ops.rejection_sample(torch.zeros(0, 10), torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int32))
    assert empty.output_tokens.shape == (0, 1) and empty.num_accepted.shape == (0,)
    out = ops.rejection_sample(torch.randn(3, 10), torch.zeros(0, dtype=torch.int64),
                               torch.zeros(4, dtype=torch.int32), temperature=0.0, return_soft_acceptance=True)
    assert out.output_tokens.shape == (3, 1) and (out.num_accepted == 0).all()
    assert out.soft_acceptance.shape == (0,)


def test_preallocated_outputs():
    b = random_batch(10, 100, 4, seed=12)
    tokens = torch.full((10, 5), 77, dtype=torch.int32)
    accepted = torch.full((10,), 77, dtype=torch.int32)
    soft = torch.full((int(b.cu_num_draft[-1]),), 7.0)
    out = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                               seed=1, max_num_draft=4, return_soft_acceptance=True, out=(tokens, accepted, soft))
    assert out.output_tokens is tokens and out.num_accepted is accepted and out.soft_acceptance is soft
    fresh = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                                 seed=1, max_num_draft=4, return_soft_acceptance=True)
    assert torch.equal(tokens, fresh.output_tokens) and torch.equal(soft, fresh.soft_acceptance)


def test_wider_output_than_needed_is_padded():
    b = random_batch(5, 50, 3, seed=13)
    out = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, seed=1, max_num_draft=9)
    assert out.output_tokens.shape == (5, 10)
    assert (out.output_tokens[:, 4:] == -1).all()


# ---------------------------------------------------------------- bad input


def _good():
    b = random_batch(3, 20, 2, seed=22)
    assert b.cu_num_draft.tolist() == [0, 2, 3, 4], "the cases below assume this layout"
    return dict(target_logits=b.target_logits, draft_tokens=b.draft_tokens, cu_num_draft=b.cu_num_draft), b


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (lambda a, b: a.update(target_logits=a["target_logits"].double()), TypeError, "target_logits"),
        (lambda a, b: a.update(target_logits=a["target_logits"][:-1]), ValueError, "target_logits"),
        (lambda a, b: a.update(target_logits=a["target_logits"][0]), ValueError, "target_logits"),
        (lambda a, b: a.update(target_logits=torch.zeros(a["target_logits"].shape[0], 0)), ValueError, "vocabulary"),
        (lambda a, b: a.update({k: v.to("meta") for k, v in a.items()}), TypeError, "unsupported device"),
        (lambda a, b: a.update(draft_tokens=a["draft_tokens"].to("meta")), ValueError, "draft_tokens"),
        (lambda a, b: a.update(draft_tokens=a["draft_tokens"].float()), TypeError, "draft_tokens"),
        (lambda a, b: a.update(draft_tokens=a["draft_tokens"] + 20), ValueError, "draft_tokens"),
        (lambda a, b: a.update(draft_tokens=a["draft_tokens"] - 100), ValueError, "draft_tokens"),
        (lambda a, b: a.update(draft_tokens=[1, 2]), TypeError, "draft_tokens"),
        (lambda a, b: a.update(cu_num_draft=a["cu_num_draft"].long()), TypeError, "cu_num_draft"),
        (lambda a, b: a.update(cu_num_draft=a["cu_num_draft"].flip(0)), ValueError, "cu_num_draft"),
        (lambda a, b: a.update(cu_num_draft=a["cu_num_draft"] + 1), ValueError, "cu_num_draft"),
        (lambda a, b: a.update(draft_logits=b.draft_logits[:, :-1]), ValueError, "draft_logits"),
        (lambda a, b: a.update(draft_logits=b.draft_logits.to(torch.float64)), TypeError, "draft_logits"),
        (lambda a, b: a.update(draft_probs=b.draft_probs[:-1]), ValueError, "draft_probs"),
        (lambda a, b: a.update(draft_logits=b.draft_logits, draft_probs=b.draft_probs), ValueError, "at most one"),
        (lambda a, b: a.update(temperature=-1.0), ValueError, "temperature"),
        (lambda a, b: a.update(temperature=float("nan")), ValueError, "temperature"),
        (lambda a, b: a.update(temperature=torch.ones(2)), ValueError, "temperature"),
        (lambda a, b: a.update(temperature=torch.tensor([1.0, -2.0, 1.0])), ValueError, "temperature"),
        (lambda a, b: a.update(temperature="hot"), TypeError, "temperature"),
        (lambda a, b: a.update(seed=torch.ones(2, dtype=torch.int64)), ValueError, "seed"),
        (lambda a, b: a.update(seed=torch.ones(3, dtype=torch.int32)), TypeError, "seed"),
        (lambda a, b: a.update(seed=1.5), TypeError, "seed"),
        (lambda a, b: a.update(seed=1, generator=torch.Generator()), ValueError, "generator"),
        (lambda a, b: a.update(offset=-1), ValueError, "offset"),
        (lambda a, b: a.update(offset=2**32), ValueError, "offset"),
        (lambda a, b: a.update(offset=torch.tensor([2**40])), ValueError, "offset"),
        (lambda a, b: a.update(max_num_draft=0), ValueError, "max_num_draft"),
        (lambda a, b: a.update(max_num_draft=-1), ValueError, "max_num_draft"),
        (lambda a, b: a.update(out=(torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), None),
                                max_num_draft=2), ValueError, "output_tokens"),
        (lambda a, b: a.update(out=(torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, dtype=torch.int32), None),
                                max_num_draft=2), TypeError, "output_tokens"),
    ],
)
def test_bad_input_raises_naming_the_argument(change, exc, words):
    args, b = _good()
    change(args, b)
    with pytest.raises(exc, match=words):
        ops.rejection_sample(**args)


# ------------------------------------------------------- torch integration


def test_registered_custom_ops_pass_opcheck():
    b = random_batch(4, 50, 3, seed=31)
    plain = (None, 0, None, 1.0, None, 0.0, None)  # bonus_tokens, top_k, top_ks, top_p, top_ps, min_p, min_ps
    args = (b.target_logits, b.draft_tokens, b.cu_num_draft, b.draft_logits, None, None, 1.0, None, 5, None, 0, None,
            3, *plain, True, True)
    torch.library.opcheck(torch.ops.dspark.rejection_sample.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    out = (torch.empty(4, 4, dtype=torch.int32), torch.empty(4, dtype=torch.int32),
           torch.empty(int(b.cu_num_draft[-1])), torch.empty(4, 4))
    torch.library.opcheck(torch.ops.dspark.rejection_sample_out.default, args[:-2] + out,
                          test_utils=("test_schema", "test_faketensor"))
    s = sub_vocab_batch(4, 50, 9, 3, seed=32)
    sub_args = (s.target_logits, s.draft_tokens, s.cu_num_draft, s.draft_logits, None, s.draft_vocab, 1.0, None, 5,
                None, 0, None, 3, *plain, True, False)
    torch.library.opcheck(torch.ops.dspark.rejection_sample.default, sub_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    truncated = (None, 0, torch.tensor([0, 3, 7, 50], dtype=torch.int32), 1.0,
                 torch.tensor([1.0, 0.9, 0.5, 0.2]), 0.0, torch.tensor([0.0, 0.1, 0.0, 0.3]))
    trunc_args = args[:13] + truncated + (True, True)
    torch.library.opcheck(torch.ops.dspark.rejection_sample.default, trunc_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_matches_eager():
    b = random_batch(16, 200, 4, seed=41)

    def step(target, tokens, cu, draft):
        out = ops.rejection_sample(target, tokens, cu, draft_logits=draft, temperature=0.9, seed=8, offset=2,
                                   max_num_draft=4, return_soft_acceptance=True)
        return out.output_tokens, out.num_accepted + 1, out.soft_acceptance

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(b.target_logits, b.draft_tokens, b.cu_num_draft, b.draft_logits)
    want = step(b.target_logits, b.draft_tokens, b.cu_num_draft, b.draft_logits)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
