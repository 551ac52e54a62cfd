"""Exactness of rejection_sample, tested statistically.

A toy target and a toy drafter are Markov chains over V = 3 tokens, so draft
tokens depend on earlier draft tokens. Many requests run rounds of speculative
generation (0..gamma drafts each per round, chosen at random) through the op,
and the first 3 committed tokens of each request are compared with the exact
distribution of the target chain at that request's temperature: 27 cells,
Pearson's chi-square at a false-alarm rate of 1e-6 (stats.ALPHA).

Power: each group has at least stats.samples_for_power(27) requests, which
gives a power of at least 0.99 against any bias of total variation 1% in the
joint distribution of the three tokens (stats.py derives the bound); each test
asserts this before it asserts the fit. The same harness with a deliberately
wrong residual rule is rejected (test_wrong_rules_are_caught).
"""

import pytest
import torch

from dspark import ops
from markov import MODES, Chains, encode, naive_sampler, sequence_probs, simulate, tempered
from stats import assert_fits, assert_rejects, samples_for_power

VOCAB = 3
NUM_TOKENS = 3
START = 0
CELLS = VOCAB**NUM_TOKENS
TEMPERATURES = (1.0, 0.6, 1.7)


def _groups(temperatures, per_group):
    return torch.tensor([t for t in temperatures for _ in range(per_group)], dtype=torch.float32)


def check_lossless(sampler, mode, *, gamma=3, chains_seed=1, seed=0, device=torch.device("cpu")):
    chains = Chains.random(VOCAB, chains_seed)
    per_group = samples_for_power(CELLS)
    temps = _groups(TEMPERATURES + (0.0,), per_group)
    # the greedy group needs no statistics: a few requests suffice
    temps = torch.cat([temps[: len(TEMPERATURES) * per_group], torch.zeros(2000)])
    out = simulate(sampler, chains, temps, mode=mode, gamma=gamma, num_tokens=NUM_TOKENS, start=START,
                   seed=seed, device=device)
    fits = []
    for i, t in enumerate(TEMPERATURES):
        rows = out[i * per_group:(i + 1) * per_group]
        fits.append(assert_fits(encode(rows, VOCAB), sequence_probs(tempered(chains.target_logits, t), START,
                                                                     NUM_TOKENS), f"{mode} T={t}"))
    greedy = out[len(TEMPERATURES) * per_group:]
    path = [START]
    for _ in range(NUM_TOKENS):
        path.append(int(chains.target_logits[path[-1]].argmax()))
    assert (greedy == torch.tensor(path[1:])).all(), "greedy requests must follow the target argmax chain"
    return fits


@pytest.mark.parametrize("mode", MODES)
def test_lossless_cpu(mode):
    check_lossless(ops.rejection_sample, mode)


def test_lossless_cpu_long_blocks_bfloat16_targets():
    """gamma = 7 and bfloat16 logits: the distribution is that of the
    bfloat16-rounded target chain (what the op is given)."""
    chains = Chains.random(VOCAB, 5)
    chains = Chains(chains.target_logits.bfloat16().float(), chains.draft_logits)
    per_group = samples_for_power(CELLS)
    temps = torch.full((per_group,), 1.0)

    def sampler(target_logits, *args, **kw):
        return ops.rejection_sample(target_logits.bfloat16(), *args, **kw)

    out = simulate(sampler, chains, temps, mode="logits", gamma=7, num_tokens=NUM_TOKENS, start=START, seed=3)
    assert_fits(encode(out, VOCAB), sequence_probs(tempered(chains.target_logits, 1.0), START, NUM_TOKENS), "bf16")


def test_harness_accepts_a_correct_reimplementation():
    """The plain-PyTorch sampler with the exact rule passes the same test, so
    the harness itself is not biased towards the op's random numbers."""
    check_lossless(naive_sampler("exact"), "logits", seed=7)


@pytest.mark.parametrize("rule", ["from_target", "abs"])
@pytest.mark.parametrize("mode", ["logits", "onehot"])
def test_wrong_rules_are_caught(rule, mode):
    """A correction drawn from p_t instead of the residual, or from |p_t - p_d|
    (a residual without max(0, .)), is rejected at the same sample size."""
    chains = Chains.random(VOCAB, 1)
    per_group = samples_for_power(CELLS)
    temps = torch.full((per_group,), 1.0)
    out = simulate(naive_sampler(rule), chains, temps, mode=mode, gamma=3, num_tokens=NUM_TOKENS, start=START, seed=9)
    assert_rejects(encode(out, VOCAB), sequence_probs(tempered(chains.target_logits, 1.0), START, NUM_TOKENS), rule)


# --------------------------------------------------------- draft vocabulary

SUB_VOCAB = 4  # the target's tokens
SUB_MAP = torch.tensor([3, 0, 2], dtype=torch.int32)  # the drafter's columns; token 1 is never drafted
SUB_CELLS = SUB_VOCAB**NUM_TOKENS


def _sub_drafter(mode: str, seed: int = 11):
    """A draft chain over the map's columns: q(column | previous target token).
    Returns the simulate() drafter hook: drafts are target ids, rows are the
    draft logits (or probabilities) over the V_d columns."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(SUB_VOCAB, SUB_MAP.numel(), generator=g) * 1.5

    def drafter(prev, temps, gamma, call_seed):
        gen = torch.Generator().manual_seed(call_seed)
        drafts = torch.empty(prev.numel(), gamma, dtype=torch.int64)
        rows = torch.empty(prev.numel(), gamma, SUB_MAP.numel())
        t = torch.where(temps > 0, temps, torch.ones_like(temps)).double().unsqueeze(-1)
        for k in range(gamma):
            logits = table[prev]
            q = torch.softmax(logits.double() / t, -1) if mode == "logits" else torch.softmax(logits.double(), -1)
            column = torch.multinomial(q, 1, generator=gen).squeeze(-1)
            rows[:, k] = logits if mode == "logits" else q.float()
            prev = SUB_MAP.long()[column]
            drafts[:, k] = prev
        return drafts, rows

    return drafter


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_lossless_with_a_draft_vocabulary(mode):
    """Drafts over 3 of the target's 4 tokens (target mass outside the map: the
    residual there is p_t), draft chains that depend on earlier drafts: the
    first 3 committed tokens follow the target chain. 64 cells; each group has
    stats.samples_for_power(64) requests (power >= 0.99 against TV 1%)."""
    chains = Chains.random(SUB_VOCAB, 4)
    per_group = samples_for_power(SUB_CELLS)
    temps = _groups((1.0, 0.7), per_group)

    def sampler(*args, **kw):
        return ops.rejection_sample(*args, draft_vocab=SUB_MAP, **kw)

    out = simulate(sampler, chains, temps, mode=mode, gamma=3, num_tokens=NUM_TOKENS, start=1, seed=5,
                   drafter=_sub_drafter(mode))
    for i, t in enumerate((1.0, 0.7)):
        rows = out[i * per_group:(i + 1) * per_group]
        assert_fits(encode(rows, SUB_VOCAB), sequence_probs(tempered(chains.target_logits, t), 1, NUM_TOKENS),
                    f"draft vocabulary {mode} T={t}")


def test_a_wrong_draft_vocabulary_is_caught():
    """The same rounds verified as if the columns scored other tokens (a
    permuted map): the committed tokens are biased and the test rejects them."""
    chains = Chains.random(SUB_VOCAB, 4)
    temps = _groups((1.0,), samples_for_power(SUB_CELLS))

    def sampler(*args, **kw):
        return ops.rejection_sample(*args, draft_vocab=torch.tensor([0, 3, 2], dtype=torch.int32), **kw)

    out = simulate(sampler, chains, temps, mode="logits", gamma=3, num_tokens=NUM_TOKENS, start=1, seed=5,
                   drafter=_sub_drafter("logits"))
    assert_rejects(encode(out, SUB_VOCAB), sequence_probs(tempered(chains.target_logits, 1.0), 1, NUM_TOKENS),
                   "permuted map")
