"""dspark.compat: vLLM's and FlashInfer's call layouts, tested against the
semantics their own test suites pin down (re-expressed here from what those
suites assert), and against transformers' speculative sampling case."""

import pytest
import torch

from dspark import ops, reference
from dspark.compat import flashinfer, vllm
from stats import assert_fits, samples_for_power

V = 100


def target_logits_for(argmaxes):
    """vLLM's greedy helper: 100 at each row's argmax, -100 elsewhere."""
    logits = torch.full((len(argmaxes), V), -100.0)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes, dtype=torch.int64)] = 100.0
    return logits


# (drafts per request, target argmax per draft row and the bonus per request, expected output)
GREEDY_CASES = [
    ([[1, 2, 3]], [[1, 2, 3, 4]], [[1, 2, 3, 4]]),  # perfect match
    ([[1, 2, 3]], [[1, 5, 3, 4]], [[1, 5, -1, -1]]),  # early mismatch
    ([[1, 2], [3]], [[1, 2, 5], [3, 4]], [[1, 2, 5], [3, 4, -1]]),  # multiple sequences
    ([[1]], [[1, 2]], [[1, 2]]),  # single token
    ([[]], [[5]], [[5]]),  # no drafts
    ([[1, 2, 3], [4, 5, 6]], [[1, 2, 7, 6], [4, 8, 6, 9]], [[1, 2, 7, -1], [4, 8, -1, -1]]),
    ([[1, 2]], [[1, 2, 3]], [[1, 2, 3]]),
    ([[1]], [[2, 3]], [[2, -1]]),
    ([[1, 2], [3, 4]], [[1, 5, 6], [3, 4, 7]], [[1, 5, -1], [3, 4, 7]]),
]


@pytest.mark.parametrize("bonus_given", [True, False])
@pytest.mark.parametrize("drafts,targets,expected", GREEDY_CASES)
def test_vllm_greedy_cases(drafts, targets, expected, bonus_given):
    """vLLM's greedy tests: with bonus ids from the caller (target rows for the
    drafts only) or with bonus rows in the logits; all_greedy or temperature 0."""
    ids = torch.tensor([x for d in drafts for x in d], dtype=torch.int32)
    counts = [len(d) for d in drafts]
    if bonus_given:
        logits = target_logits_for([x for t in targets for x in t[:-1]])
        bonus = torch.tensor([[t[-1]] for t in targets])
    else:
        logits = target_logits_for([x for t in targets for x in t])
        bonus = None
    for kw in (dict(all_greedy=True), dict(temperature=torch.zeros(len(drafts))),
               dict(temperature=torch.full((len(drafts),), -1.0))):
        out = vllm.rejection_sample(ids, counts, None, logits, bonus, **kw)
        assert out.dtype == torch.int32
        assert out.tolist() == expected
    assert vllm.parse_output(out, V) == [[t for t in row if t != -1] for row in expected]


def test_vllm_seeded_requests_are_deterministic_and_batch_independent():
    """vLLM's seeded test: requests with a generator give the same tokens every
    time, whatever else is in the batch."""
    g = torch.Generator().manual_seed(0)
    B, k = 8, 3
    ids = torch.randint(0, 1000, (B * k,), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(B * k, 1000, generator=g)
    bonus = torch.randint(0, 1000, (B, 1), generator=g)
    seeded = {i: torch.Generator().manual_seed(100 + i) for i in range(0, B, 2)}
    runs = []
    for rep in range(5):
        gens = {i: torch.Generator().manual_seed(100 + i) for i in seeded}
        runs.append(vllm.rejection_sample(ids, [k] * B, None, logits, bonus, temperature=torch.ones(B),
                                          generators=gens, generator=torch.Generator().manual_seed(rep)))
    for run in runs[1:]:
        assert torch.equal(run[::2], runs[0][::2])
    alone = vllm.rejection_sample(ids[:k], [k], None, logits[:k], bonus[:1], temperature=torch.ones(1),
                                  generators={0: torch.Generator().manual_seed(100)})
    assert torch.equal(alone[0], runs[0][0])


@pytest.mark.parametrize("k", [1, 5, 99])
def test_vllm_top_k_outputs_stay_in_the_top_k(k):
    """vLLM's top-k test: logits 0 with +0.1 on k random ids per request; every
    emitted token is one of them."""
    B, n = 100, 3
    g = torch.Generator().manual_seed(k)
    logits = torch.zeros(B * (n + 1), V)
    allowed = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B)])
    for r in range(B):
        logits[r * (n + 1):(r + 1) * (n + 1), allowed[r]] = 0.1
    ids = torch.randint(0, V, (B * n,), generator=g)
    out = vllm.rejection_sample(ids, [n] * B, None, logits, temperature=torch.ones(B), top_k=torch.full((B,), k))
    for r in range(B):
        row = [t for t in out[r].tolist() if t != -1]
        assert set(row) <= set(allowed[r].tolist())


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_vllm_top_p_outputs_stay_in_the_nucleus(p):
    """vLLM's top-p test: every emitted token is in the smallest set of most
    probable tokens whose mass reaches p (ascending cumulative sum <= 1 - p
    masked, the largest always kept)."""
    B, n = 100, 3
    g = torch.Generator().manual_seed(int(p * 100))
    logits = torch.randn(B * (n + 1), V, generator=g)
    ids = torch.randint(0, V, (B * n,), generator=g)
    out = vllm.rejection_sample(ids, [n] * B, None, logits, temperature=torch.ones(B), top_p=torch.full((B,), p))
    for r in range(B):
        for j, token in enumerate(out[r].tolist()):
            if token == -1:
                continue
            row = logits[r * (n + 1) + j]
            probs, order = torch.softmax(row, -1).sort()
            masked = probs.cumsum(0) <= 1 - p
            masked[-1] = False
            assert token in order[~masked].tolist()


def test_vllm_placeholder_draft_is_rejected():
    """vLLM's placeholder test: drafts [1, 99, -1], target argmax [1, 99, 7],
    bonus 9, sampled: the first two are accepted, the third slot holds a valid
    token drawn from that row."""
    logits = target_logits_for([1, 99, 7])
    out = vllm.rejection_sample(torch.tensor([1, 99, -1]), [3], None, logits, torch.tensor([[9]]),
                                temperature=torch.ones(1), generators={0: torch.Generator().manual_seed(0)})
    assert out[0, 0] == 1 and out[0, 1] == 99 and out[0, 2] == 7 and out[0, 3] == -1


def test_vllm_layout_approximates_the_target_distribution():
    """vLLM's distribution test, made a chi-square: V = 10, two drafts from a
    fixed draft distribution, one request per sample; the first emitted token
    follows the target distribution (10 cells at 1e-6, power >= 0.99 at TV 1%)."""
    Vs, k = 10, 2
    N = samples_for_power(Vs)
    g = torch.Generator().manual_seed(5)
    draft = torch.softmax(torch.rand(Vs, generator=g) * 3, -1)
    target = torch.rand(Vs, generator=g) * 3
    ids = torch.multinomial(draft, N * k, replacement=True, generator=g)
    out = vllm.rejection_sample(ids, [k] * N, draft.expand(N * k, Vs), target.expand(N * (k + 1), Vs),
                                temperature=torch.ones(N))
    assert_fits(out[:, 0].long(), torch.softmax(target.double(), -1), "vllm layout")


def test_vllm_truncation_and_min_p_match_the_op():
    g = torch.Generator().manual_seed(3)
    B, n, Vs = 6, 3, 500
    logits = torch.randn(B * n, Vs, generator=g) * 2
    ids = torch.randint(0, Vs, (B * n,), generator=g)
    bonus = torch.randint(0, Vs, (B, 1), generator=g)
    kw = dict(temperature=torch.tensor([0.0, 0.7, 1.0, 1.2, 1e-7, 0.9]), top_k=[0, 10, -1, 500, 20, 30],
              top_p=[1.0, 0.8, 0.9, 0.5, 1.0, 0.95], min_p=[0.0, 0.0, 0.05, 0.0, 0.0, 0.1],
              generators={i: torch.Generator().manual_seed(i) for i in range(B)})
    out = vllm.rejection_sample(ids, [n] * B, None, logits, bonus, **kw)
    seeds = torch.tensor([int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(i)))
                          for i in range(B)])
    direct = ops.rejection_sample(logits, ids, torch.arange(B + 1, dtype=torch.int32) * n, bonus_tokens=bonus[:, 0],
                                  temperature=torch.tensor([0.0, 0.7, 1.0, 1.2, 0.0, 0.9]),
                                  top_k=torch.tensor([0, 10, 0, 0, 20, 30], dtype=torch.int32),
                                  top_p=torch.tensor([1.0, 0.8, 0.9, 0.5, 1.0, 0.95]),
                                  min_p=torch.tensor([0.0, 0.0, 0.05, 0.0, 0.0, 0.1]), seed=seeds)
    assert torch.equal(out, direct.output_tokens)


# ------------------------------------------------------------- FlashInfer


@pytest.mark.parametrize("B,n,vocab", [(1, 1, 111), (99, 3, 111), (17, 7, 32000)])
def test_flashinfer_one_hot_targets_accept_everything(B, n, vocab):
    """FlashInfer's one-hot case: the target is one-hot at the drafts and at a
    random bonus id, so the output is exactly those ids."""
    g = torch.Generator().manual_seed(B + n)
    draft_probs = torch.softmax(torch.randn(B, n, vocab, generator=g), -1)
    ids = torch.randint(0, vocab, (B, n), generator=g, dtype=torch.int32)
    target_ids = torch.cat([ids.long(), torch.randint(0, vocab, (B, 1), generator=g)], dim=1)
    target = torch.nn.functional.one_hot(target_ids, vocab).float()
    out, accepted, emitted = flashinfer.chain_speculative_sampling(draft_probs, ids, target,
                                                                   generator=torch.Generator().manual_seed(1))
    assert out.dtype == ids.dtype and torch.equal(out.long(), target_ids)
    assert (emitted == n).all() and (accepted == n).all()


@pytest.mark.parametrize("B,n,vocab", [(99, 5, 111), (32, 7, 4096)])
def test_flashinfer_random_cases_keep_the_layout(B, n, vocab):
    """FlashInfer's random case: ids in range, -1 after the first non-draft
    token, emitted + 1 tokens, accepted >= emitted; counters add in place."""
    g = torch.Generator().manual_seed(vocab)
    draft_probs = torch.softmax(torch.randn(B, n, vocab, generator=g), -1)
    ids = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=g).reshape(B, n).to(torch.int32)
    target = torch.softmax(torch.randn(B, n + 1, vocab, generator=g), -1)
    acc0 = torch.full((B,), 3, dtype=torch.int32)
    emi0 = torch.full((B,), 5, dtype=torch.int32)
    out, accepted, emitted = flashinfer.chain_speculative_sampling(draft_probs, ids, target, acc0.clone(),
                                                                   emi0.clone(), generator=g)
    assert out.shape == (B, n + 1)
    emitted_here, accepted_here = emitted - 5, accepted - 3
    assert torch.equal(emitted_here + 1, (out != -1).sum(1).to(emitted.dtype))
    assert (accepted_here >= emitted_here).all() and (accepted_here <= n).all()
    for r in range(B):
        e = int(emitted_here[r])
        assert torch.equal(out[r, :e], ids[r, :e])
        assert 0 <= int(out[r, e]) < vocab and (out[r, e + 1:] == -1).all()


def test_flashinfer_docstring_example():
    """FlashInfer's documented example: position 1 has target probability 0,
    so it is rejected and the residual puts all its mass on token 0."""
    draft = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]])
    ids = torch.tensor([[2, 1]], dtype=torch.int32)
    target = torch.tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]])
    for seed in range(20):
        out, accepted, emitted = flashinfer.chain_speculative_sampling(
            draft, ids, target, generator=torch.Generator().manual_seed(seed))
        assert out.tolist() == [[2, 0, -1]] and accepted.tolist() == [1] and emitted.tolist() == [1]


def test_flashinfer_layout_is_exact():
    """The first emitted token of many requests follows the (normalised) target
    row: 8 cells, chi-square at 1e-6, power >= 0.99 at TV 1%."""
    Vs, n = 8, 3
    N = samples_for_power(Vs)
    g = torch.Generator().manual_seed(2)
    draft = torch.softmax(torch.randn(Vs, generator=g), -1)
    target = torch.softmax(torch.randn(Vs, generator=g) * 1.5, -1)
    ids = torch.multinomial(draft, N * n, replacement=True, generator=g).reshape(N, n).to(torch.int32)
    out, _, _ = flashinfer.chain_speculative_sampling(draft.expand(N, n, Vs), ids, target.expand(N, n + 1, Vs),
                                                      seed=7)
    assert_fits(out[:, 0].long(), target.double(), "flashinfer layout")


# ------------------------------------------------------------- transformers


def test_transformers_speculative_sampling_case():
    """transformers' test: candidates 1, 4, 5 from a one-hot assistant (logits
    +-10); the target is one-hot at 1, at 4, then puts all its mass on 8: two
    matches, then the residual gives 8."""
    Vs = 10
    draft = torch.full((3, Vs), -10.0)
    draft[0, 1] = draft[1, 4] = draft[2, 5] = 10.0
    target = torch.full((4, Vs), -10.0)
    target[0, 1] = target[1, 4] = 10.0
    target[2] = -float("inf")
    target[2, 8] = 10.0
    out = ops.rejection_sample(target, torch.tensor([1, 4, 5]), torch.tensor([0, 3], dtype=torch.int32),
                               draft_logits=draft, temperature=1.0, seed=0)
    ref = reference.rejection_sample(target, torch.tensor([1, 4, 5]), torch.tensor([0, 3], dtype=torch.int32),
                                     draft_logits=draft, temperature=1.0, seed=0)
    assert out.output_tokens.tolist() == [[1, 4, 8, -1]] == ref.output_tokens.tolist()
    assert int(out.num_accepted) == 2
