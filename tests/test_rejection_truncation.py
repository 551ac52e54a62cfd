"""rejection_sample with truncated sampling (top-k, top-p, min-p), placeholder
drafts (-1), bonus tokens drawn by the caller, and the log-probabilities of
the committed tokens: the definitions (against the sort-based oracle in
dspark.reference), boundary and tie cases, per-request mixes, exactness of
the joint distribution (chi-square, stated power), and bad values."""

import math

import pytest
import torch

from dspark import ops, reference
from markov import Chains, encode, sequence_probs, simulate
from rejection_cases import assert_matches_reference, random_batch
from stats import assert_fits, samples_for_power


def probe(row: torch.Tensor, temperature: float = 1.0, **truncation) -> torch.Tensor:
    """The op's truncated target distribution of one logit row, read exactly:
    one request whose V drafts are the V token ids with one-hot draft
    probabilities, every target row equal to `row`; soft acceptance at draft k
    is sum_v min(p_t(v), [v = k]) = p_t(k)."""
    V = row.numel()
    target = row.unsqueeze(0).expand(V + 1, V).contiguous()
    out = ops.rejection_sample(target, torch.arange(V), torch.tensor([0, V], dtype=torch.int32),
                               draft_probs=torch.eye(V), temperature=temperature, seed=0,
                               return_soft_acceptance=True, **truncation)
    return out.soft_acceptance.double()


def expected(row: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0) -> torch.Tensor:
    return reference._truncated_softmax2(row, temperature, top_k, top_p, min_p)


CASES = [dict(top_k=1), dict(top_k=5), dict(top_k=100), dict(top_p=0.3), dict(top_p=0.9), dict(top_p=0.999),
         dict(min_p=0.05), dict(min_p=0.5), dict(top_k=20, top_p=0.7), dict(top_k=50, min_p=0.1),
         dict(top_p=0.8, min_p=0.02), dict(top_k=30, top_p=0.95, min_p=0.01)]


# ------------------------------------------------------------- definitions


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("vocab,dtype", [(7, torch.float32), (300, torch.float32), (300, torch.bfloat16),
                                         (2100, torch.float32), (2100, torch.bfloat16)])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_truncated_distribution_is_the_definition(case, vocab, dtype, temperature):
    """The kept set equals the sort-based definition's exactly, and the kept
    probabilities equal the renormalised softmax over it (bfloat16 rows have
    many ties; 2100 columns span two chunks and every radix level)."""
    g = torch.Generator().manual_seed(vocab + int(temperature * 10))
    row = (torch.randn(vocab, generator=g) * 2.5).to(dtype).float()
    if "top_k" in case:
        case = dict(case, top_k=min(case["top_k"], vocab))
    got = probe(row, temperature, **case)
    want = expected(row, temperature, **case)
    assert torch.equal(got > 0, want > 0), f"kept {int((got > 0).sum())} tokens, the definition {int((want > 0).sum())}"
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_top_k_keeps_every_value_tied_with_the_kth():
    row = torch.tensor([5.0, 4.0, 4.0, 4.0, 3.0, 2.0, 4.0, 1.0])
    assert (probe(row, top_k=2) > 0).tolist() == [True, True, True, True, False, False, True, False]
    assert (probe(row, top_k=1) > 0).sum() == 1
    assert (probe(row, top_k=5) > 0).sum() == 5  # 5, four 4s: the 5th is a 4, so exactly these
    assert (probe(row, top_k=6) > 0).sum() == 6


# At this temperature the op's scale log2(e) / T is exactly 1: base-2 logits z = logits.
UNIT_T = float(torch.tensor(math.log2(math.e), dtype=torch.float32))


def test_top_p_keeps_the_tie_group_at_the_boundary_whole():
    row = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # masses 8, 2, 2, 2, 1, 1 (of 16)
    p = probe(row, UNIT_T, top_p=0.625)  # 8 < 10 <= 14: the boundary is inside the 2-group, kept whole
    assert (p > 0).tolist() == [True, True, True, True, False, False]
    torch.testing.assert_close(p[:4], torch.tensor([8, 2, 2, 2], dtype=torch.float64) / 14, atol=1e-6, rtol=0)
    p = probe(row, UNIT_T, top_p=0.5)  # exactly the first token's mass: it alone reaches top_p
    assert (p > 0).tolist() == [True] + [False] * 5
    p = probe(row, UNIT_T, top_p=0.875)  # exactly the first two groups
    assert (p > 0).tolist() == [True] * 4 + [False] * 2
    p = probe(row, UNIT_T, top_p=0.9)  # past them: the next group (two 0s) joins whole
    assert (p > 0).all()


def test_min_p_cut_is_inclusive_at_exact_ratios():
    row = torch.tensor([0.0, -1.0, -2.0, -3.0])  # p / p_max = 1, 1/2, 1/4, 1/8
    assert (probe(row, UNIT_T, min_p=0.5) > 0).tolist() == [True, True, False, False]
    assert (probe(row, UNIT_T, min_p=0.25) > 0).tolist() == [True, True, True, False]
    assert (probe(row, UNIT_T, min_p=1.0) > 0).tolist() == [True, False, False, False]
    assert (probe(row, UNIT_T, min_p=0.2) > 0).tolist() == [True, True, True, False]


def test_the_maximum_is_always_kept_and_off_values_change_nothing():
    g = torch.Generator().manual_seed(3)
    row = torch.randn(500, generator=g) * 4
    for case in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=1, top_p=1e-6, min_p=1.0)):
        p = probe(row, **case)
        assert (p > 0).sum() == 1 and int(p.argmax()) == int(row.argmax())
    b = random_batch(16, 500, 4, seed=4)
    base = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                                seed=7, return_soft_acceptance=True)
    for off in (dict(top_k=500), dict(top_k=0, top_p=1.0, min_p=0.0),
                dict(top_k=torch.zeros(16, dtype=torch.int32), top_p=torch.ones(16), min_p=torch.zeros(16))):
        out = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                                   seed=7, return_soft_acceptance=True, **off)
        assert torch.equal(out.output_tokens, base.output_tokens)
        assert torch.equal(out.soft_acceptance, base.soft_acceptance)


# ------------------------------------------------------------- mixed batches


def _mix(R: int, vocab: int, seed: int):
    """Per-request temperatures (some greedy) and truncations (some off)."""
    g = torch.Generator().manual_seed(seed)
    temps = torch.tensor([0.0, 1.0, 0.7, 1.3])[torch.randint(0, 4, (R,), generator=g)]
    top_k = torch.where(torch.rand(R, generator=g) < 0.5, torch.randint(1, vocab + 1, (R,), generator=g), 0)
    top_p = torch.where(torch.rand(R, generator=g) < 0.5, torch.rand(R, generator=g) * 0.9 + 0.05, 1.0)
    min_p = torch.where(torch.rand(R, generator=g) < 0.3, torch.rand(R, generator=g) * 0.2, 0.0)
    return temps, top_k.to(torch.int32), top_p, min_p


@pytest.mark.parametrize("mode", ["onehot", "logits", "probs"])
@pytest.mark.parametrize("vocab,dtype", [(50, torch.float32), (4099, torch.float32), (32000, torch.bfloat16)])
def test_per_request_mixes_match_the_reference(mode, vocab, dtype):
    R = 24 if vocab < 10000 else 8
    b = random_batch(R, vocab, 5, seed=vocab + len(mode), dtype=dtype, spread=2.0)
    temps, top_k, top_p, min_p = _mix(R, vocab, seed=vocab)
    kw = dict(b.kwargs(mode), temperature=temps, top_k=top_k, top_p=top_p, min_p=min_p, seed=11, offset=4,
              return_soft_acceptance=True, return_logprobs=True)
    out = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, **kw)
    ref = reference.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, return_margins=True, **kw)
    assert_matches_reference(out, ref, f"{mode} V={vocab}")
    torch.testing.assert_close(out.soft_acceptance, ref.soft_acceptance, atol=5e-6, rtol=0)
    same = (out.output_tokens == ref.output_tokens).all(-1)
    torch.testing.assert_close(out.logprobs[same], ref.logprobs[same], atol=2e-5, rtol=1e-5)


def test_committed_tokens_are_always_inside_the_truncation():
    """Over many seeds, every committed token of a sampled request (accepted
    drafts, corrections, bonus tokens) is in the kept set of its row; drafts
    outside it are never accepted."""
    R, V = 32, 200
    b = random_batch(R, V, 6, seed=5, spread=1.0, agreement=3.0)
    temps = torch.full((R,), 1.0)
    top_k = torch.randint(1, 20, (R,), generator=torch.Generator().manual_seed(1)).to(torch.int32)
    top_p = torch.full((R,), 0.8)
    kept = []
    for r in range(R):
        begin, end = int(b.cu_num_draft[r]), int(b.cu_num_draft[r + 1])
        rows = b.target_logits[begin + r:end + r + 1]
        kept.append([reference.truncation_mask(reference._scaled(row, 1.0), int(top_k[r]), 0.8) for row in rows])
    outside = 0
    for seed in range(40):
        out = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                                   temperature=temps, top_k=top_k, top_p=top_p, seed=seed)
        for r in range(R):
            for j in range(int(out.num_accepted[r]) + 1):
                assert kept[r][j][int(out.output_tokens[r, j])], f"seed {seed} request {r} position {j}"
        outside += sum(int(not kept[r][k][int(b.draft_tokens[int(b.cu_num_draft[r]) + k])])
                       for r in range(R) for k in range(int(b.cu_num_draft[r + 1] - b.cu_num_draft[r])))
    assert outside > 0, "the batch must propose drafts outside the truncation for the test to mean anything"


# -------------------------------------------------------------- exactness

VOCAB = 4
NUM_TOKENS = 3
CELLS = VOCAB**NUM_TOKENS
# Groups told apart by their temperature (simulate passes each call the active
# requests' temperatures): temperature -> (top_k, top_p, min_p)
GROUPS = {1.0: (2, 1.0, 0.0), 0.8: (0, 0.6, 0.1), 1.3: (3, 0.9, 0.0)}


def _truncated_chain(target_logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float):
    return torch.stack([expected(row, temperature, top_k, top_p, min_p) for row in target_logits])


@pytest.mark.parametrize("mode", ["onehot", "logits", "probs"])
def test_lossless_with_truncation(mode):
    """Draft chains over V = 4 tokens that depend on earlier drafts, 0..3 drafts
    per round; the first 3 committed tokens of each request follow the
    truncated target chain (64 cells, chi-square at 1e-6). Three groups: top-k
    2, top-p 0.6 with min-p 0.1, top-k 3 with top-p 0.9. Each group has
    stats.samples_for_power(64) requests: power >= 0.99 against a TV bias of
    1% in the joint distribution. The drafter is not truncated, so drafts
    outside the support are proposed and must be rejected."""
    chains = Chains.random(VOCAB, 21)
    per_group = samples_for_power(CELLS)
    temps = torch.tensor([t for t in GROUPS for _ in range(per_group)], dtype=torch.float32)

    def sampler(target_logits, draft_tokens, cu, *, temperature, **kw):
        params = [GROUPS[round(float(t), 4)] for t in temperature.cpu()]
        return ops.rejection_sample(target_logits, draft_tokens, cu, temperature=temperature,
                                    top_k=torch.tensor([p[0] for p in params], dtype=torch.int32),
                                    top_p=torch.tensor([p[1] for p in params]),
                                    min_p=torch.tensor([p[2] for p in params]), **kw)

    out = simulate(sampler, chains, temps, mode=mode, gamma=3, num_tokens=NUM_TOKENS, start=1, seed=13)
    for i, (t, params) in enumerate(GROUPS.items()):
        rows = out[i * per_group:(i + 1) * per_group]
        chain = _truncated_chain(chains.target_logits, t, *params)
        assert_fits(encode(rows, VOCAB), sequence_probs(chain, 1, NUM_TOKENS), f"{mode} T={t} {params}")


def test_placeholder_final_token_follows_the_target_row():
    """A request whose drafts start with -1 commits one token drawn from p_t of
    its first row (no residual: nothing was drafted), whatever follows the -1.
    5 cells, stats.samples_for_power(5) requests (power >= 0.99 at TV 1%)."""
    V = 5
    N = samples_for_power(V)
    row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    target = row.repeat(3 * N, 1)
    tokens = torch.tensor([-1, 3]).repeat(N)  # junk after the -1: a likely token
    cu = torch.arange(0, 2 * N + 1, 2, dtype=torch.int32)
    out = ops.rejection_sample(target, tokens, cu, draft_logits=row.repeat(2 * N, 1), temperature=1.0,
                               seed=torch.arange(N), top_k=4)
    assert (out.num_accepted == 0).all() and (out.output_tokens[:, 1:] == -1).all()
    assert_fits(out.output_tokens[:, 0].long(), expected(row, 1.0, top_k=4), "placeholder")


# -------------------------------------------------------------- placeholders


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_placeholders_end_the_drafts_and_what_follows_is_not_read(temperature):
    b = random_batch(32, 300, 6, seed=8, agreement=0.3)
    tokens = b.draft_tokens.clone()
    g = torch.Generator().manual_seed(2)
    for r in range(32):
        begin, end = int(b.cu_num_draft[r]), int(b.cu_num_draft[r + 1])
        if end > begin and torch.rand(1, generator=g) < 0.6:
            cut = int(torch.randint(begin, end, (1,), generator=g))
            tokens[cut:end] = -1
            tokens[cut + 1:end] = torch.randint(0, 300, (end - cut - 1,), generator=g)  # junk after the -1
    kw = dict(draft_logits=b.draft_logits, temperature=temperature, seed=3, return_soft_acceptance=True,
              return_logprobs=True)
    out = ops.rejection_sample(b.target_logits, tokens, b.cu_num_draft, **kw)
    ref = reference.rejection_sample(b.target_logits, tokens, b.cu_num_draft, return_margins=True, **kw)
    assert_matches_reference(out, ref, "placeholders")
    torch.testing.assert_close(out.soft_acceptance, ref.soft_acceptance, atol=2e-6, rtol=0)
    for r in range(32):
        begin, end = int(b.cu_num_draft[r]), int(b.cu_num_draft[r + 1])
        drafts = tokens[begin:end].tolist()
        if -1 in drafts:
            assert int(out.num_accepted[r]) <= drafts.index(-1)
            assert float(out.soft_acceptance[begin + drafts.index(-1)]) == 0.0
    junk = tokens.clone()
    for r in range(32):
        begin, end = int(b.cu_num_draft[r]), int(b.cu_num_draft[r + 1])
        drafts = tokens[begin:end].tolist()
        if -1 in drafts:
            at = begin + drafts.index(-1)
            junk[at + 1:end] = (junk[at + 1:end] + 7) % 300
    again = ops.rejection_sample(b.target_logits, junk, b.cu_num_draft, **kw)
    assert torch.equal(again.output_tokens, out.output_tokens)


def test_other_negative_ids_and_out_of_range_ids_are_refused():
    b = random_batch(4, 50, 3, seed=1)
    for bad in (-2, 50):
        tokens = b.draft_tokens.clone()
        tokens[0] = bad
        with pytest.raises(ValueError, match="draft_tokens"):
            ops.rejection_sample(b.target_logits, tokens, b.cu_num_draft)


# ------------------------------------------------------------- bonus tokens


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bonus_tokens_given_replace_the_bonus_rows(temperature):
    """vLLM's layout: target rows for the drafts only and the caller's bonus
    tokens. Requests that reject commit what the full layout commits (the same
    random numbers); requests that accept everything end with their bonus."""
    R, V = 40, 100
    b = random_batch(R, V, 4, seed=12, agreement=0.2)
    cu = b.cu_num_draft
    rows = [int(cu[r]) + r + k for r in range(R) for k in range(int(cu[r + 1] - cu[r]))]
    bonus = torch.randint(0, V, (R,), generator=torch.Generator().manual_seed(4))
    kw = dict(draft_logits=b.draft_logits, temperature=temperature, seed=6, return_logprobs=True)
    full = ops.rejection_sample(b.target_logits, b.draft_tokens, cu, **kw)
    given = ops.rejection_sample(b.target_logits[rows], b.draft_tokens, cu, bonus_tokens=bonus, **kw)
    ref = reference.rejection_sample(b.target_logits[rows], b.draft_tokens, cu, bonus_tokens=bonus,
                                     return_margins=True, **kw)
    assert_matches_reference(given, ref, "bonus given")
    assert torch.equal(given.num_accepted, full.num_accepted)
    n = cu[1:] - cu[:-1]
    for r in range(R):
        a = int(given.num_accepted[r])
        if a == int(n[r]):
            assert int(given.output_tokens[r, a]) == int(bonus[r]) and float(given.logprobs[r, a]) == 0.0
        else:
            assert torch.equal(given.output_tokens[r], full.output_tokens[r])
    assert (given.num_accepted == n).any() and (given.num_accepted < n).any()
    with pytest.raises(ValueError, match="N_draft = "):
        ops.rejection_sample(b.target_logits, b.draft_tokens, cu, bonus_tokens=bonus)
    with pytest.raises(ValueError, match="bonus_tokens"):
        ops.rejection_sample(b.target_logits[rows], b.draft_tokens, cu, bonus_tokens=torch.full((R,), V))


# ------------------------------------------------------------ log-probabilities


def test_logprobs_are_those_of_the_committed_tokens():
    R, V = 24, 700
    b = random_batch(R, V, 5, seed=30)
    temps, top_k, top_p, min_p = _mix(R, V, seed=31)
    out = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                               temperature=temps, top_k=top_k, top_p=top_p, min_p=min_p, seed=2,
                               return_logprobs=True)
    for r in range(R):
        a = int(out.num_accepted[r])
        begin = int(b.cu_num_draft[r])
        assert torch.isinf(out.logprobs[r, a + 1:]).all() and (out.logprobs[r, a + 1:] < 0).all()
        for j in range(a + 1):
            row = b.target_logits[begin + r + j]
            token = int(out.output_tokens[r, j])
            T = float(temps[r])
            if T > 0:
                p = expected(row, T, int(top_k[r]), float(top_p[r]), float(min_p[r]))[token]
            else:  # greedy: the untruncated softmax at temperature 1
                p = torch.softmax(row.double(), -1)[token]
            assert float(out.logprobs[r, j]) == pytest.approx(math.log(float(p)), abs=2e-5, rel=1e-5)


# ------------------------------------------------------------- bad values


@pytest.mark.parametrize("name,value,error", [
    ("top_k", -1, ValueError), ("top_k", 51, ValueError), ("top_k", 2.5, TypeError), ("top_k", True, TypeError),
    ("top_p", 0.0, ValueError), ("top_p", 1.5, ValueError), ("top_p", float("nan"), ValueError),
    ("top_p", "0.5", TypeError), ("min_p", -0.1, ValueError), ("min_p", 1.01, ValueError),
    ("min_p", float("nan"), ValueError),
    ("top_k", torch.tensor([1, 2, -1, 3]), ValueError), ("top_k", torch.tensor([1, 2, 51, 3]), ValueError),
    ("top_k", torch.tensor([1, 2, 3]), ValueError), ("top_k", torch.tensor([1.0, 2, 3, 4]), TypeError),
    ("top_k", torch.tensor([1, 2, 2**40, 3]), ValueError),
    ("top_p", torch.tensor([0.5, 0.0, 1.0, 1.0]), ValueError), ("top_p", torch.tensor([0.5, float("nan"), 1, 1]), ValueError),
    ("top_p", torch.tensor([1, 1, 1, 1]), TypeError), ("min_p", torch.tensor([0.0, 2.0, 0.0, 0.0]), ValueError),
    ("min_p", torch.ones(4, 1), ValueError),
])
def test_bad_truncation_values_are_refused_by_name(name, value, error):
    b = random_batch(4, 50, 3, seed=2)
    with pytest.raises(error, match=name):
        ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, **{name: value})
