"""markov_sample and confidence: agreement with the PyTorch reference, the
joint distribution of a drafted block, losslessness of a full round with
rejection_sample, invariance, bad input, torch integration, and CUDA."""

import zlib

import pytest
import torch

from dspark import ops, reference
from markov import Chains, encode, sequence_probs, simulate, tempered
from stats import assert_fits, samples_for_power

HEADS = ("vanilla", "gated", "rnn")
MARGIN = 1e-4


def make_drafter(V, rank, d, gamma, R, seed, dtype=torch.float32, spread=2.0, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    return dict(
        U=(torch.randn(R, gamma, V, generator=g) * spread),
        anchor=torch.randint(0, V, (R,), generator=g),
        w1=(torch.randn(V, rank, generator=g) * scale).to(dtype),
        w2=(torch.randn(V, rank, generator=g) * scale).to(dtype),
        hidden=torch.randn(R, gamma, d, generator=g),
        gate_weight=(torch.randn(rank, d + rank, generator=g) * 0.2).to(dtype),
        gate_bias=(torch.randn(rank, generator=g) * 0.2).to(dtype),
        joint_weight=(torch.randn(3 * rank, 2 * rank + d, generator=g) * 0.2).to(dtype),
        joint_bias=(torch.randn(3 * rank, generator=g) * 0.2).to(dtype),
    )


def head_kwargs(p, head):
    kw = dict(head=head)
    if head == "gated":
        kw.update(gate_weight=p["gate_weight"], gate_bias=p["gate_bias"], hidden=p["hidden"])
    if head == "rnn":
        kw.update(joint_weight=p["joint_weight"], joint_bias=p["joint_bias"], hidden=p["hidden"])
    return kw


def tolerance(head, dtype, w2=None):
    """With 16-bit weights the gated and RNN heads round their computed A rows
    to 16 bits (markov.h). The backends and the float64 reference compute A in
    different precisions, so a coordinate within rounding of a 16-bit boundary
    may round the other way: one 16-bit ulp of |a| < 2 (2^-7 for bfloat16,
    2^-10 for float16) times a W2 entry per flipped coordinate. The bound
    allows two flips of the largest W2 entry; decisions closer than that are
    exempt from the token comparison."""
    if dtype != torch.float32 and head != "vanilla":
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        largest = float(w2.float().abs().max()) if w2 is not None else 2.5
        bound = 2 * ulp * largest
        return dict(margin=bound, atol=bound)
    return dict(margin=MARGIN, atol=2e-4)


def assert_matches(out, ref, label, margin=MARGIN, atol=2e-4):
    """Tokens equal; a request is exempt from the position of its first
    near-tie on (its later positions depend on that token)."""
    close = ref.margins < margin
    exempt = torch.cumsum(close.long(), dim=1) > 0
    diff = (out.draft_tokens.cpu() != ref.draft_tokens) & ~exempt
    assert not diff.any(), f"{label}: tokens differ at {torch.nonzero(diff)[:5].tolist()}"
    assert int(exempt[:, 0].sum()) <= max(2, exempt.shape[0] // 4), f"{label}: too many near-ties"
    keep = ~exempt
    torch.testing.assert_close(out.logprobs.cpu()[keep], ref.logprobs[keep], atol=atol, rtol=1e-5)
    torch.testing.assert_close(out.lse.cpu()[keep], ref.lse[keep], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_matches_reference(head, dtype, temperature):
    p = make_drafter(1000, 32, 24, 6, 12, seed=zlib.crc32(f"{head} {temperature}".encode()) % 1000, dtype=dtype)
    kw = head_kwargs(p, head)
    temps = torch.full((12,), temperature)
    out = ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], temperature=temps, seed=5, offset=1,
                            return_corrected_logits=True, **kw)
    ref = reference.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], temperature=temps, seed=5, offset=1, **kw)
    tol = tolerance(head, dtype, p["w2"])
    assert_matches(out, ref, f"{head} {dtype} T={temperature}", **tol)
    torch.testing.assert_close(out.corrected_logits, ref.corrected_logits, atol=tol["atol"] / 2, rtol=1e-5)
    assert out.draft_tokens.dtype == torch.int64
    if temperature == 0.0:
        assert (out.logprobs == 0).all()
        torch.testing.assert_close(out.lse, out.corrected_logits.amax(-1))


@pytest.mark.parametrize("vocab,rank,gamma", [(49152, 256, 2), (151936, 128, 2), (257, 16, 16), (3, 8, 1)])
def test_matches_reference_shapes(vocab, rank, gamma):
    p = make_drafter(vocab, rank, 8, gamma, 3, seed=vocab % 97, dtype=torch.bfloat16, spread=3.0, scale=0.15)
    temps = torch.tensor([1.0, 0.0, 0.6])
    out = ops.markov_sample(p["U"].bfloat16(), p["anchor"].int(), p["w1"], p["w2"], temperature=temps,
                            seed=torch.tensor([3, 4, 5]))
    ref = reference.markov_sample(p["U"].bfloat16(), p["anchor"], p["w1"], p["w2"], temperature=temps,
                                  seed=torch.tensor([3, 4, 5]))
    assert_matches(out, ref, f"V={vocab}")


def test_corrected_logits_are_what_was_sampled():
    """logprob of each token = corrected / T - lse, and exp(corrected / T - lse)
    sums to 1: the reported distribution is the sampled one."""
    p = make_drafter(3000, 16, 8, 5, 6, seed=3)
    out = ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], temperature=0.9, seed=1,
                            return_corrected_logits=True)
    log_p = out.corrected_logits.double() / 0.9 - out.lse.double().unsqueeze(-1)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(6, 5, dtype=torch.float64), atol=1e-5, rtol=0)
    picked = log_p.gather(-1, out.draft_tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(picked.float(), out.logprobs, atol=1e-5, rtol=0)


# ------------------------------------------------------------ distribution


def _exact_block_probs(p, head, temperature, gamma, V):
    """P(x_1..x_gamma) of one request by enumeration, from the head in float64."""
    probs = torch.zeros(V ** gamma, dtype=torch.float64)
    rank = p["w1"].shape[1]
    w1, w2 = p["w1"].double(), p["w2"].double()

    def rec(k, prev, state, prefix_prob, index):
        if k == gamma:
            probs[index] = prefix_prob
            return
        e = w1[prev]
        h = p["hidden"][0, k].double()
        new_state = state
        if head == "gated":
            a = torch.sigmoid(p["gate_weight"].double() @ torch.cat([h, e]) + p["gate_bias"].double()) * e
        elif head == "rnn":
            y = p["joint_weight"].double() @ torch.cat([state, e, h]) + p["joint_bias"].double()
            gate = torch.sigmoid(y[:rank])
            new_state = gate * state + (1 - gate) * torch.tanh(y[rank:2 * rank])
            a = torch.tanh(y[2 * rank:])
        else:
            a = e
        q = torch.softmax((p["U"][0, k].double() + w2 @ a) / temperature, -1)
        for x in range(V):
            rec(k + 1, x, new_state, prefix_prob * float(q[x]), index * V + x)

    rec(0, int(p["anchor"][0]), torch.zeros(rank, dtype=torch.float64), 1.0, 0)
    return probs


@pytest.mark.parametrize("head", HEADS)
def test_joint_distribution_of_a_block(head):
    """gamma = 3 over V = 3: the 27 blocks follow the product of the corrected
    softmaxes (chi-square at 1e-6, power >= 0.99 against a 1% bias in total
    variation: stats.py)."""
    V, gamma = 3, 3
    p = make_drafter(V, 4, 5, gamma, 1, seed=11, spread=1.0, scale=0.8)
    N = samples_for_power(V ** gamma)
    kw = head_kwargs(p, head)
    if "hidden" in kw:
        kw["hidden"] = p["hidden"].expand(N, -1, -1)
    out = ops.markov_sample(p["U"].expand(N, -1, -1), p["anchor"].expand(N), p["w1"], p["w2"],
                            temperature=0.8, seed=2024, **kw)
    assert_fits(encode(out.draft_tokens, V), _exact_block_probs(p, head, 0.8, gamma, V), head)


# ------------------------------------------------------- draft vocabulary


def sub_drafter(V, Vd, rank, d, gamma, R, seed, dtype=torch.float32):
    """A drafter over Vd of V target ids: U and W2 have Vd columns / rows, W1 a
    row per target id."""
    p = make_drafter(V, rank, d, gamma, R, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randperm(V, generator=g)[:Vd]
    p["U"], p["w2"], p["ids"] = p["U"][:, :, ids].contiguous(), p["w2"][ids].contiguous(), ids.to(torch.int32)
    return p


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_draft_vocabulary_matches_reference(head, temperature):
    """Columns of a draft vocabulary (600 of 3000 target ids, in random order):
    tokens are target ids from the map, W1 rows are looked up by target id."""
    p = sub_drafter(3000, 600, 16, 8, 5, 7, seed=21)
    kw = head_kwargs(p, head)
    out = ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], draft_vocab=p["ids"], temperature=temperature,
                            seed=4, return_corrected_logits=True, **kw)
    ref = reference.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], draft_vocab=p["ids"],
                                  temperature=temperature, seed=4, **kw)
    assert_matches(out, ref, f"draft vocabulary {head}")
    assert torch.isin(out.draft_tokens, p["ids"].long()).all()
    assert out.corrected_logits.shape == (7, 5, 600)
    torch.testing.assert_close(out.corrected_logits, ref.corrected_logits, atol=1e-4, rtol=1e-5)


def test_draft_vocabulary_joint_distribution_of_a_block():
    """gamma = 3 over a map of 3 of 5 target ids (the anchor outside it): the
    27 blocks follow the enumerated product of the corrected softmaxes, with W1
    rows taken at the drafted target ids (chi-square at 1e-6, power >= 0.99
    against a 1% bias)."""
    V, gamma = 5, 3
    ids = torch.tensor([4, 0, 2], dtype=torch.int32)
    p = make_drafter(V, 4, 5, gamma, 1, seed=12, spread=1.0, scale=0.8)
    p["anchor"] = torch.tensor([1])
    U, w2 = p["U"][:, :, ids.long()], p["w2"][ids.long()]
    N = samples_for_power(3 ** gamma)
    out = ops.markov_sample(U.expand(N, -1, -1).contiguous(), p["anchor"].expand(N), p["w1"], w2,
                            draft_vocab=ids, temperature=0.8, seed=7)
    column = {int(t): c for c, t in enumerate(ids.tolist())}
    index = torch.zeros(N, dtype=torch.int64)
    for k in range(gamma):
        index = index * 3 + torch.tensor([column[int(t)] for t in out.draft_tokens[:, k]])
    probs = torch.zeros(3 ** gamma, dtype=torch.float64)
    w1, w2d = p["w1"].double(), w2.double()

    def rec(k, prev, prob, at):
        if k == gamma:
            probs[at] = prob
            return
        q = torch.softmax((U[0, k].double() + w2d @ w1[prev]) / 0.8, -1)
        for c in range(3):
            rec(k + 1, int(ids[c]), prob * float(q[c]), at * 3 + c)

    rec(0, 1, 1.0, 0)
    assert_fits(index, probs, "draft vocabulary block")


@pytest.mark.parametrize("change,words", [
    (lambda p: p.update(ids=torch.tensor([1, 1, 2], dtype=torch.int32)), "token id 1 twice"),
    (lambda p: p.update(ids=torch.tensor([1, 2, 99], dtype=torch.int32)), "draft_vocab"),
    (lambda p: p.update(ids=torch.tensor([1, 2], dtype=torch.int32)), "draft_vocab"),
    (lambda p: p.update(w2=p["w2"][:2]), "w2"),
])
def test_bad_draft_vocabulary(change, words):
    p = sub_drafter(50, 3, 8, 6, 3, 2, seed=5)
    change(p)
    with pytest.raises(ValueError, match=words):
        ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], draft_vocab=p["ids"])


# --------------------------------------------- a full round: lossless end to end


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_rounds_with_rejection_sample_are_lossless(mode):
    """Drafts from markov_sample, verified by rejection_sample with the corrected
    logits (draft_logits) or with p_d = exp(corrected / T - lse) (probabilities
    rebuilt from the reported log-sum-exp): the committed tokens follow the
    target chain (27 cells, power >= 0.99 against a 1% bias)."""
    V, gamma = 3, 3
    chains = Chains.random(V, 21)
    g = torch.Generator().manual_seed(22)
    U_by_anchor = torch.randn(V, gamma, V, generator=g)
    w1, w2 = torch.randn(V, 4, generator=g), torch.randn(V, 4, generator=g) * 0.7

    def drafter(anchors, temps, k, seed):
        out = ops.markov_sample(U_by_anchor[anchors], anchors, w1, w2, temperature=temps, seed=seed,
                                return_corrected_logits=True)
        if mode == "logits":
            return out.draft_tokens, out.corrected_logits
        log_p = out.corrected_logits.double() / temps.double().view(-1, 1, 1) - out.lse.double().unsqueeze(-1)
        return out.draft_tokens, log_p.exp()

    N = samples_for_power(V ** 3)
    temps = torch.full((N,), 0.9)
    got = simulate(ops.rejection_sample, chains, temps, mode=mode, gamma=gamma, num_tokens=3, start=1, seed=5,
                   drafter=drafter)
    assert_fits(encode(got, V), sequence_probs(tempered(chains.target_logits, 0.9), 1, 3), mode)


# ---------------------------------------------------------------- invariance


def test_batch_invariance_with_per_request_seeds():
    p = make_drafter(700, 16, 8, 4, 9, seed=31)
    seeds = torch.randint(0, 2**62, (9,))
    temps = torch.linspace(0, 1.4, 9)
    full = ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], temperature=temps, seed=seeds)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    permuted = ops.markov_sample(p["U"][perm], p["anchor"][perm], p["w1"], p["w2"], temperature=temps[perm],
                                 seed=seeds[perm])
    assert torch.equal(permuted.draft_tokens, full.draft_tokens[perm])
    alone = ops.markov_sample(p["U"][4:5], p["anchor"][4:5], p["w1"], p["w2"], temperature=temps[4:5],
                              seed=seeds[4:5])
    assert torch.equal(alone.draft_tokens[0], full.draft_tokens[4])
    again = ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], temperature=temps, seed=seeds)
    assert torch.equal(again.draft_tokens, full.draft_tokens) and torch.equal(again.lse, full.lse)


# ----------------------------------------------------------------- confidence


def test_confidence_matches_reference_and_applies_sts():
    p = make_drafter(500, 16, 24, 5, 7, seed=41)
    drafts = torch.randint(0, 500, (7, 5))
    weight, bias = torch.randn(1, 24 + 16) * 0.3, torch.tensor([0.2])
    temps = torch.tensor([1.0, 1.5, 2.0, 0.8, 3.0])
    for t in (None, temps):
        out = ops.confidence(p["hidden"], p["w1"], p["anchor"], drafts, weight, bias, temperatures=t)
        ref = reference.confidence(p["hidden"], p["w1"], p["anchor"], drafts, weight, bias, temperatures=t)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # position k uses the token before it: changing the last draft changes nothing
    changed = drafts.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 500
    assert torch.equal(ops.confidence(p["hidden"], p["w1"], p["anchor"], changed, weight, bias).conf,
                       ops.confidence(p["hidden"], p["w1"], p["anchor"], drafts, weight, bias).conf)


# ------------------------------------------------------------------ bad input


def _good():
    p = make_drafter(50, 8, 6, 3, 2, seed=51)
    return dict(base_logits=p["U"], anchor_tokens=p["anchor"], w1=p["w1"], w2=p["w2"]), p


@pytest.mark.parametrize("change,exc,words", [
    (lambda a, p: a.update(base_logits=a["base_logits"][0]), ValueError, "base_logits"),
    (lambda a, p: a.update(base_logits=a["base_logits"].double()), TypeError, "base_logits"),
    (lambda a, p: a.update(anchor_tokens=a["anchor_tokens"] + 50), ValueError, "anchor_tokens"),
    (lambda a, p: a.update(anchor_tokens=a["anchor_tokens"].float()), TypeError, "anchor_tokens"),
    (lambda a, p: a.update(anchor_tokens=a["anchor_tokens"][:1]), ValueError, "anchor_tokens"),
    (lambda a, p: a.update(w1=a["w1"][:, :4]), ValueError, "w2"),
    (lambda a, p: a.update(w2=a["w2"][:40]), ValueError, "w2"),
    (lambda a, p: a.update(head="lstm"), ValueError, "head"),
    (lambda a, p: a.update(head="gated"), ValueError, "hidden"),
    (lambda a, p: a.update(head="gated", hidden=p["hidden"]), ValueError, "gate_weight"),
    (lambda a, p: a.update(head="gated", hidden=p["hidden"], gate_weight=p["gate_weight"][:, :5],
                           gate_bias=p["gate_bias"]), ValueError, "gate_weight"),
    (lambda a, p: a.update(head="rnn", hidden=p["hidden"], joint_weight=p["joint_weight"],
                           joint_bias=p["joint_bias"][:3]), ValueError, "joint_bias"),
    (lambda a, p: a.update(head="rnn", hidden=p["hidden"][:, :2], joint_weight=p["joint_weight"],
                           joint_bias=p["joint_bias"]), ValueError, "hidden"),
    (lambda a, p: a.update(temperature=-1.0), ValueError, "temperature"),
    (lambda a, p: a.update(temperature=torch.ones(5)), ValueError, "temperature"),
    (lambda a, p: a.update(offset=-3), ValueError, "offset"),
])
def test_bad_input(change, exc, words):
    args, p = _good()
    change(args, p)
    with pytest.raises(exc, match=words):
        ops.markov_sample(**args)


def test_confidence_bad_input():
    p = make_drafter(50, 8, 6, 3, 2, seed=52)
    drafts = torch.randint(0, 50, (2, 3))
    with pytest.raises(ValueError, match="weight"):
        ops.confidence(p["hidden"], p["w1"], p["anchor"], drafts, torch.zeros(1, 5), torch.zeros(1))
    with pytest.raises(ValueError, match="draft_tokens"):
        ops.confidence(p["hidden"], p["w1"], p["anchor"], drafts + 50, torch.zeros(1, 14), torch.zeros(1))
    with pytest.raises(ValueError, match="temperatures"):
        ops.confidence(p["hidden"], p["w1"], p["anchor"], drafts, torch.zeros(1, 14), torch.zeros(1),
                       temperatures=torch.tensor([1.0, 0.0, 1.0]))


def test_empty_block_and_batch():
    p = make_drafter(20, 4, 3, 2, 2, seed=53)
    out = ops.markov_sample(p["U"][:, :0], p["anchor"], p["w1"], p["w2"])
    assert out.draft_tokens.shape == (2, 0)
    out = ops.markov_sample(p["U"][:0], p["anchor"][:0], p["w1"], p["w2"])
    assert out.draft_tokens.shape == (0, 2)


def test_custom_ops_and_compile():
    p = make_drafter(300, 8, 6, 3, 4, seed=61)
    plain = (0, None, 1.0, None, 0.0, None)  # top_k, top_ks, top_p, top_ps, min_p, min_ps
    args = (p["U"], p["anchor"], p["w1"], p["w2"], None, 0, None, None, None, None, None, 1.0, None, 3, None, 0, None,
            *plain, True)
    torch.library.opcheck(torch.ops.dspark.markov_sample.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    R = p["U"].shape[0]
    truncated = (0, torch.full((R,), 5, dtype=torch.int32), 0.9, None, 0.0, torch.full((R,), 0.01))
    torch.library.opcheck(torch.ops.dspark.markov_sample.default, args[:17] + truncated + (True,),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

    def step(U, anchor, w1, w2):
        out = ops.markov_sample(U, anchor, w1, w2, temperature=0.7, seed=3, return_corrected_logits=True)
        return out.draft_tokens, out.logprobs, out.corrected_logits

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(p["U"], p["anchor"], p["w1"], p["w2"])
    want = step(p["U"], p["anchor"], p["w1"], p["w2"])
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab,rank,R,d", [(1000, 32, 20, 64), (49152, 256, 16, 64), (4099, 128, 3, 64),
                                            (3001, 40, 37, 600), (2048, 160, 33, 96)])
def test_cuda_matches_cpu(head, dtype, vocab, rank, R, d):
    """Shapes of the tiled head products too: rank 40 (a partial 32-row slice),
    2 rank = 320 and d = 600 (more than one 256-column input chunk), R = 33 and
    37 (a partial request tile, and hidden rows R gamma not a multiple of 16)."""
    p = make_drafter(vocab, rank, d, 5, R, seed=vocab + rank, dtype=dtype, scale=0.1)
    kw = head_kwargs(p, head)
    temps = torch.linspace(0, 1.2, R)
    cpu = ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], temperature=temps, seed=9,
                            return_corrected_logits=True, **kw)
    ref = reference.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], temperature=temps, seed=9, **kw)
    ckw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gpu = ops.markov_sample(p["U"].cuda(), p["anchor"].cuda(), p["w1"].cuda(), p["w2"].cuda(),
                            temperature=temps.cuda(), seed=9, return_corrected_logits=True, **ckw)
    tol = tolerance(head, dtype, p["w2"])
    assert_matches(gpu, ref, "cuda vs reference", **tol)
    assert_matches(cpu, ref, "cpu vs reference", **tol)
    torch.testing.assert_close(gpu.corrected_logits.cpu(), cpu.corrected_logits, atol=max(1e-3, tol["atol"]),
                               rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_cpu_with_a_draft_vocabulary(head, dtype):
    p = sub_drafter(49152, 8192, 64, 32, 5, 20, seed=8, dtype=dtype)
    kw = head_kwargs(p, head)
    temps = torch.linspace(0, 1.2, 20)
    cpu = ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], draft_vocab=p["ids"], temperature=temps, seed=9,
                            **kw)
    ref = reference.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], draft_vocab=p["ids"], temperature=temps,
                                  seed=9, **kw)
    ckw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gpu = ops.markov_sample(p["U"].cuda(), p["anchor"].cuda(), p["w1"].cuda(), p["w2"].cuda(),
                            draft_vocab=p["ids"].cuda(), temperature=temps.cuda(), seed=9, **ckw)
    tol = tolerance(head, dtype, p["w2"])
    assert_matches(gpu, ref, "cuda vs reference", **tol)
    assert_matches(cpu, ref, "cpu vs reference", **tol)


@pytest.mark.cuda
def test_cuda_joint_distribution_and_graph_capture():
    V, gamma = 3, 3
    p = make_drafter(V, 16, 5, gamma, 1, seed=11, spread=1.0, scale=0.3, dtype=torch.bfloat16)
    N = samples_for_power(V ** gamma)
    out = ops.markov_sample(p["U"].expand(N, -1, -1).cuda(), p["anchor"].expand(N).cuda(), p["w1"].cuda(),
                            p["w2"].cuda(), temperature=0.8, seed=2024)
    assert_fits(encode(out.draft_tokens.cpu(), V), _exact_block_probs(p, "vanilla", 0.8, gamma, V), "cuda")

    q = make_drafter(5000, 64, 8, 4, 8, seed=12, dtype=torch.bfloat16)
    U, anchor, w1, w2 = (q[k].cuda() for k in ("U", "anchor", "w1", "w2"))
    seeds = torch.arange(8, device="cuda")
    ops.markov_sample(U, anchor, w1, w2, seed=seeds)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = ops.markov_sample(U, anchor, w1, w2, seed=seeds)
    for shift in (0, 100):
        seeds.copy_(torch.arange(8, device="cuda") + shift)
        graph.replay()
        eager = ops.markov_sample(U, anchor, w1, w2, seed=seeds)
        assert torch.equal(static.draft_tokens, eager.draft_tokens)


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [2**32 + 7, -1])
def test_cuda_offsets_are_range_checked(offset):
    """As on the CPU: an offset tensor outside [0, 2^32) is an error, not a
    silently truncated stream."""
    p = make_drafter(50, 8, 4, 3, 2, seed=1)
    with pytest.raises(ValueError, match="offset"):
        ops.markov_sample(p["U"].cuda(), p["anchor"].cuda(), p["w1"].cuda(), p["w2"].cuda(), seed=1,
                          offset=torch.tensor([offset], device="cuda"))


# -------------------------------------------------------------- truncation


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("vocab", [300, 4099])
def test_truncation_matches_reference(head, vocab):
    """Per-request top-k / top-p / min-p (some off, some greedy requests): tokens,
    truncated logprobs and lse as the reference; corrected logits -inf exactly
    outside each truncated row's kept set."""
    R, gamma = 16, 4
    p = make_drafter(vocab, 32, 24, gamma, R, seed=vocab + len(head))
    g = torch.Generator().manual_seed(vocab)
    temps = torch.tensor([0.0, 1.0, 0.7, 1.3])[torch.randint(0, 4, (R,), generator=g)]
    top_k = torch.where(torch.rand(R, generator=g) < 0.5, torch.randint(1, 60, (R,), generator=g), 0).to(torch.int32)
    top_p = torch.where(torch.rand(R, generator=g) < 0.5, torch.rand(R, generator=g) * 0.8 + 0.1, 1.0)
    min_p = torch.where(torch.rand(R, generator=g) < 0.3, torch.rand(R, generator=g) * 0.1, 0.0)
    kw = dict(head_kwargs(p, head), temperature=temps, seed=9, offset=2, top_k=top_k, top_p=top_p, min_p=min_p)
    out = ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], return_corrected_logits=True, **kw)
    ref = reference.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], **kw)
    assert_matches(out, ref, f"{head} V={vocab} truncated", **tolerance(head, torch.float32))
    cut = torch.isinf(out.corrected_logits)
    assert torch.equal(cut, torch.isinf(ref.corrected_logits))
    for r in range(R):
        truncated = float(temps[r]) > 0 and (0 < int(top_k[r]) < vocab or float(top_p[r]) < 1 or float(min_p[r]) > 0)
        assert bool(cut[r].any()) == truncated
    picked = cut.gather(-1, out.draft_tokens.unsqueeze(-1))
    assert not picked.any(), "a token outside its row's kept set was sampled"
    sampled = temps > 0  # logprob = corrected / T - lse over the kept set, which sums to 1
    log_p = out.corrected_logits.double()[sampled] / temps[sampled].double().view(-1, 1, 1) - \
        out.lse.double()[sampled].unsqueeze(-1)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(int(sampled.sum()), gamma, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_truncated_rows_follow_the_truncated_distribution():
    """One position over V = 6 sampled many times (per-request seeds): the
    tokens follow the truncated softmax (top-k 4 then top-p 0.7; chi-square at
    1e-6 with stats.samples_for_power(6) samples, power >= 0.99 at TV 1%)."""
    V = 6
    p = make_drafter(V, 4, 5, 1, 1, seed=17, spread=1.0, scale=0.5)
    N = samples_for_power(V)
    out = ops.markov_sample(p["U"].expand(N, -1, -1), p["anchor"].expand(N), p["w1"], p["w2"], temperature=0.9,
                            seed=torch.arange(N), top_k=4, top_p=0.7, return_corrected_logits=True)
    c = ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], return_corrected_logits=True).corrected_logits[0, 0]
    want = reference._truncated_softmax2(c, 0.9, 4, 0.7, 0.0)
    assert torch.equal(want > 0, ~torch.isinf(out.corrected_logits[0, 0]))
    assert 1 < int((want > 0).sum()) < V
    assert_fits(out.draft_tokens[:, 0], want, "truncated")


def test_truncated_drafts_verified_with_their_corrected_logits_are_lossless():
    """Drafts sampled truncated (top-k 2 of V = 3) and verified against an
    untruncated target with the corrected logits (-inf outside the kept set)
    as draft_logits: the committed tokens follow the target chain (27 cells,
    power >= 0.99 at TV 1%)."""
    V, gamma = 3, 3
    chains = Chains.random(V, 23)
    g = torch.Generator().manual_seed(24)
    U_by_anchor = torch.randn(V, gamma, V, generator=g)
    w1, w2 = torch.randn(V, 4, generator=g), torch.randn(V, 4, generator=g) * 0.7

    def drafter(anchors, temps, k, seed):
        out = ops.markov_sample(U_by_anchor[anchors], anchors, w1, w2, temperature=temps, seed=seed, top_k=2,
                                return_corrected_logits=True)
        return out.draft_tokens, out.corrected_logits

    N = samples_for_power(V ** 3)
    got = simulate(ops.rejection_sample, chains, torch.full((N,), 0.9), mode="logits", gamma=gamma, num_tokens=3,
                   start=1, seed=6, drafter=drafter)
    assert_fits(encode(got, V), sequence_probs(tempered(chains.target_logits, 0.9), 1, 3), "truncated drafts")


@pytest.mark.parametrize("name,value", [("top_k", -1), ("top_k", 301), ("top_p", 0.0), ("min_p", 2.0),
                                        ("top_p", torch.tensor([0.5] * 3)), ("top_k", torch.tensor([1.5] * 4))])
def test_bad_truncation_is_refused(name, value):
    p = make_drafter(300, 8, 6, 2, 4, seed=1)
    with pytest.raises((ValueError, TypeError), match=name):
        ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], **{name: value})


@pytest.mark.cuda
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("vocab", [1000, 49152])
def test_cuda_matches_cpu_with_truncation(head, vocab):
    R, gamma = 20, 3
    p = make_drafter(vocab, 32, 24, gamma, R, seed=vocab, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    kw = dict(temperature=torch.linspace(0.0, 1.4, R), seed=3,
              top_k=torch.randint(0, 80, (R,), generator=g).to(torch.int32),
              top_p=torch.rand(R, generator=g) * 0.9 + 0.1, min_p=torch.full((R,), 0.001))
    cpu = ops.markov_sample(p["U"], p["anchor"], p["w1"], p["w2"], return_corrected_logits=True,
                            **head_kwargs(p, head), **kw)
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    gpu = ops.markov_sample(cuda(p["U"]), cuda(p["anchor"]), cuda(p["w1"]), cuda(p["w2"]),
                            return_corrected_logits=True,
                            **{k: cuda(v) for k, v in head_kwargs(p, head).items()},
                            **{k: cuda(v) for k, v in kw.items()})
    same = (cpu.draft_tokens == gpu.draft_tokens.cpu()).float().mean()
    assert same > 0.95, f"{float(same):.3f} of tokens equal"  # products differ in rounding (markov.h)
    assert torch.equal(torch.isinf(cpu.corrected_logits)[:, 0], torch.isinf(gpu.corrected_logits.cpu())[:, 0])
