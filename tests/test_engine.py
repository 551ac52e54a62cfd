"""SpeculativeEngine: exactly lossless, greedy (against transformers' generate)
and sampled (against the enumerated sequence distribution), for every policy;
continuous batching, stop tokens, metrics, and bad requests."""

from __future__ import annotations

import itertools
from typing import Dict, List, Tuple

import pytest
import torch

import dspark.ops
from dspark import reference
from dspark.calibration import CalibrationRecorder
from dspark.engine import RunMetrics, SamplingParams, SpeculativeEngine
from dspark.models import TargetModel
from dspark.scheduler import AsyncHardwareAware, DraftGate, Fixed, HardwareAware, SPSTable, Threshold
from stats import assert_fits, assert_rejects
from tiny_models import hf_greedy, hf_model, random_drafter, set_bigram, truncate_at_stop, uneven_prompts

VOCAB = 128
MAX_NEW = 24
# a jagged steps-per-second curve: the hardware-aware policies see cliffs
SPS = SPSTable.from_curve(lambda b: 1000.0 * min(b, 48) / 48 * (0.6 if b in (9, 33, 57) else 1.0), 128)
GATED_FREE = SPSTable.from_curve(lambda b: 100.0, 256)


def policies():
    # model="measured": the policies see the jagged table's cliffs as they are
    return [Fixed(), Fixed(1), Threshold(0.5), HardwareAware(SPS, model="measured"),
            AsyncHardwareAware(SPS, model="measured")]


class Setup:
    """A tiny Llama target, its transformers twin, and greedy references."""

    def __init__(self, folder, kind: str = "llama") -> None:
        self.folder = folder
        self.hf = hf_model(folder, kind, vocab=VOCAB)
        self.target = TargetModel.load(folder)
        self._refs: Dict[Tuple[int, ...], List[int]] = {}

    def reference(self, prompt: List[int], max_new: int = MAX_NEW) -> List[int]:
        key = tuple(prompt)
        if key not in self._refs or len(self._refs[key]) < max_new:
            self._refs[key] = hf_greedy(self.hf, prompt, max(max_new, MAX_NEW))
        return self._refs[key][:max_new]

    def bigram_drafter(self, prompts, **kwargs):
        """A drafter whose Markov head is the bigram table of the target's greedy
        text: most drafts are accepted, some are not."""
        drafter = random_drafter(self.target, rank=VOCAB, **kwargs)
        set_bigram(drafter, [p + self.reference(p) for p in prompts])
        return drafter


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("qwen3"), "qwen3")


PROMPTS = uneven_prompts(16, VOCAB, seed=3)


def greedy(max_new=MAX_NEW, stops=()):
    return SamplingParams(temperature=0.0, max_new_tokens=max_new, stop_tokens=stops)


def assert_matches(setup: Setup, prompts, results, max_new=MAX_NEW):
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        assert result.error is None, result.error
        assert result.tokens == setup.reference(prompt, max_new), f"request {i} (prompt length {len(prompt)})"
        assert result.finish_reason == "length"


# ------------------------------------------------------------------ greedy


def test_target_only_matches_transformers(llama):
    for R in (1, 5, 16):
        engine = SpeculativeEngine(llama.target, max_concurrency=R, max_model_len=64)
        results = engine.generate(PROMPTS[:R], greedy())
        assert_matches(llama, PROMPTS[:R], results)
        assert engine.metrics.tau == 1.0 and engine.metrics.verified_drafts == 0


@pytest.mark.parametrize("policy", policies(), ids=lambda p: p.name)
@pytest.mark.parametrize("drafter_kind", ["bigram", "random"])
def test_greedy_lossless_every_policy(llama, policy, drafter_kind):
    drafter = llama.bigram_drafter(PROMPTS) if drafter_kind == "bigram" else random_drafter(llama.target)
    engine = SpeculativeEngine(llama.target, drafter, policy=policy, max_concurrency=16, max_model_len=64)
    results = engine.generate(PROMPTS, greedy())
    assert_matches(llama, PROMPTS, results)
    m = engine.metrics
    assert m.generated_tokens == 16 * MAX_NEW
    if drafter_kind == "bigram":  # the drafts were really used, in runs
        assert m.accepted_drafts >= 0.1 * m.generated_tokens, m
        if not (isinstance(policy, Fixed) and policy.gamma == 1):
            assert len(m.position_accepts) >= 3 and m.position_accepts[2] > 0, m
    else:  # and really rejected
        assert m.accepted_drafts < 0.2 * m.verified_drafts, m


@pytest.mark.parametrize("policy", [Fixed(), HardwareAware(GATED_FREE)], ids=lambda p: p.name)
def test_greedy_lossless_with_a_draft_vocabulary(llama, policy):
    """A drafter scoring 48 of the 128 target ids (the bigram head restricted
    to them): outputs equal the target's greedy ones, drafts are accepted, and
    every draft token is in the map."""
    prompts = PROMPTS[:8]
    drafter = llama.bigram_drafter(prompts, draft_vocab=48)
    engine = SpeculativeEngine(llama.target, drafter, policy=policy, max_concurrency=4, max_model_len=80)
    results = engine.generate(prompts, greedy())
    assert_matches(llama, prompts, results)
    assert engine.metrics.accepted_drafts > 0


@pytest.mark.parametrize("draft_vocab", [0, 48])
def test_bfloat16_speculative_equals_plain_in_the_same_dtype(llama, draft_vocab):
    """In bfloat16 (linear layers packed for the CPU), greedy speculative output
    is token for token the plain decoding of the same bfloat16 model; with a
    draft vocabulary too (its LM head rows are gathered and packed during the
    first draft, inside inference mode, and must outlive it)."""
    prompts = PROMPTS[:4]
    target = TargetModel.load(llama.folder, dtype=torch.bfloat16)
    drafter = llama.bigram_drafter(prompts, **({"draft_vocab": draft_vocab} if draft_vocab else {}))
    drafter = drafter.to(torch.bfloat16)
    plain = SpeculativeEngine(target, None, max_concurrency=4, max_model_len=80).generate(prompts, greedy())
    engine = SpeculativeEngine(target, drafter, max_concurrency=4, max_model_len=80)
    spec = engine.generate(prompts, greedy())
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert engine.metrics.accepted_drafts > 0


def test_greedy_every_batch_size(llama):
    drafter = llama.bigram_drafter(PROMPTS)
    for R in range(1, 17):
        engine = SpeculativeEngine(llama.target, drafter, max_concurrency=R, max_model_len=64)
        assert_matches(llama, PROMPTS[:R], engine.generate(PROMPTS[:R], greedy()))


@pytest.mark.parametrize("policy", policies(), ids=lambda p: p.name)
def test_greedy_requests_join_mid_run(llama, policy):
    """16 requests of different lengths through 5 slots (and a cache that holds
    fewer than 5 at their longest): requests leave and join between rounds."""
    drafter = llama.bigram_drafter(PROMPTS)
    lengths = [MAX_NEW - (7 * i) % 20 for i in range(16)]
    engine = SpeculativeEngine(llama.target, drafter, policy=policy, max_concurrency=5, max_model_len=64,
                               page_size=8, num_pages=28, max_prefill_tokens=40)
    results = engine.generate(PROMPTS, [greedy(n) for n in lengths])
    for prompt, n, result in zip(PROMPTS, lengths, results):
        assert result.error is None and result.tokens == llama.reference(prompt, n)


@pytest.mark.parametrize("head,rank,gamma", [("gated", 16, None), ("rnn", 32, None), ("vanilla", 0, None),
                                             ("vanilla", 16, 2), ("vanilla", 16, 1)])
def test_greedy_heads_gamma_and_qwen3(qwen3, head, rank, gamma):
    drafter = random_drafter(qwen3.target, head=head, rank=rank, block=5, layers=2, scale=0.3)
    engine = SpeculativeEngine(qwen3.target, drafter, gamma=gamma, max_concurrency=6, max_model_len=64)
    results = engine.generate(PROMPTS[:9], greedy())
    assert_matches(qwen3, PROMPTS[:9], results)
    verified = engine.metrics.verified_per_round
    assert 0 < verified <= (gamma or 5)


def test_stop_tokens_inside_accepted_drafts(llama):
    """Stop tokens end a request where they are, also when they arrive inside a
    run of accepted drafts (the bigram drafter is right most of the time)."""
    drafter = llama.bigram_drafter(PROMPTS)
    refs = [llama.reference(p) for p in PROMPTS]
    stop = max(set(itertools.chain(*[r[2:] for r in refs])), key=lambda t: sum(t in r[2:] for r in refs))
    other = refs[0][5]
    stops = (stop, other)
    for policy in policies():
        engine = SpeculativeEngine(llama.target, drafter, policy=policy, max_concurrency=7, max_model_len=64)
        results = engine.generate(PROMPTS, greedy(stops=stops))
        for prompt, ref, result in zip(PROMPTS, refs, results):
            tokens, reason = truncate_at_stop(ref, stops)
            assert (result.tokens, result.finish_reason) == (tokens, reason), policy.name
    assert sum(r.finish_reason == "stop" for r in results) >= 4
    # transformers' own end-of-sequence handling agrees with the truncation
    out = llama.hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=list(stops),
                            attention_mask=torch.ones(1, len(PROMPTS[0]), dtype=torch.int64))
    assert out[0, len(PROMPTS[0]):].tolist() == truncate_at_stop(refs[0], stops)[0]


# ----------------------------------------------------------------- sampled


SAMPLED_VOCAB = 3
SAMPLED_TOKENS = 4  # 3^4 = 81 sequences; 13500 samples give power >= 0.99 against TV 0.05 (stats.py)
SAMPLED_N = 13500
SAMPLED_PROMPT = [1, 2, 0, 2, 2, 1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    hf = hf_model(folder, vocab=SAMPLED_VOCAB, hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16,
                  lm_head_scale=2.0, seed=5)
    return hf.double(), TargetModel.load(folder)


def sequence_distribution(hf, prompt, temperature: float, **truncation) -> torch.Tensor:
    """P(y_1..y_n | prompt) for all V^n sequences (float64), index sum y_i V^(n-i);
    with top_k / top_p / min_p, each step's distribution truncated by the
    definition (dspark.reference.truncation_mask)."""
    V, n = SAMPLED_VOCAB, SAMPLED_TOKENS
    probs = torch.ones(1, dtype=torch.float64)
    for step in range(n):
        prefixes = list(itertools.product(range(V), repeat=step))
        batch = torch.tensor([prompt + list(p) for p in prefixes])
        with torch.no_grad():
            logits = hf(batch).logits[:, -1].double()
        step_probs = torch.softmax(logits / temperature, dim=-1)  # [V^step, V]
        if truncation:
            step_probs = torch.stack([reference._truncated_softmax2(row.float(), temperature, truncation.get("top_k", 0),
                                                                    truncation.get("top_p", 1.0),
                                                                    truncation.get("min_p", 0.0))
                                      for row in logits])
        probs = (probs.unsqueeze(1) * step_probs).reshape(-1)
    return probs


def sample_sequences(target, drafter, policy, temperature, **truncation) -> torch.Tensor:
    engine = SpeculativeEngine(target, drafter, policy=policy, max_concurrency=512, max_model_len=16, seed=11)
    params = SamplingParams(temperature=temperature, max_new_tokens=SAMPLED_TOKENS, **truncation)
    results = engine.generate([SAMPLED_PROMPT] * SAMPLED_N, params)
    tokens = torch.tensor([r.tokens for r in results])
    assert tokens.shape == (SAMPLED_N, SAMPLED_TOKENS)
    index = torch.zeros(SAMPLED_N, dtype=torch.int64)
    for i in range(SAMPLED_TOKENS):
        index = index * SAMPLED_VOCAB + tokens[:, i]
    return index, engine.metrics


# Drafting costs as much as a step; whether it pays depends on tau (about 2
# here), so the adaptive gate flips between drafting rounds and plain steps.
BORDERLINE = SPSTable.from_curve(lambda b: 100.0, 2048, draft_curve=lambda r: 0.0095, max_requests=512)


@pytest.mark.parametrize("config", ["target-only", "fixed", "async-hardware-aware", "adaptive-hardware-aware",
                                    "draft-vocabulary", "drafting-for-some"])
def test_sampled_lossless(small, config):
    """The first 4 tokens of 13500 requests follow the enumerated sequence
    distribution of the tiny target (81 cells, power >= 0.99 against TV 0.05).
    draft-vocabulary: a drafter scoring 2 of the 3 tokens (target mass outside
    its vocabulary every round)."""
    hf, target = small
    temperature = 0.8 if config == "fixed" else 1.0
    extra = {"draft_vocab": 2} if config == "draft-vocabulary" else {}
    # adaptive: blocks of 2, so that the first round's verification is not bound by the 4-token budget
    # (the gate learns only from requests whose budget did not bind)
    block = 2 if config == "adaptive-hardware-aware" else 3
    drafter = None if config == "target-only" else random_drafter(target, rank=16, block=block, scale=0.5, seed=2,
                                                                  **extra)
    policy = Fixed()
    if config == "async-hardware-aware":
        policy = AsyncHardwareAware(SPSTable.from_curve(lambda b: 100.0 * min(b, 900) / 900, 2048), model="measured")
    if config == "adaptive-hardware-aware":
        policy = HardwareAware(BORDERLINE, gate=DraftGate(BORDERLINE.envelope(), memory=0.5, probe_min=1, probe_max=2,
                                                            probe_budget=0.0, measured=False))
    if config == "drafting-for-some":  # rounds drafting for all, a third, one, none, half of the requests
        policy = DraftCycle()
    index, metrics = sample_sequences(target, drafter, policy, temperature)
    if drafter is not None:  # drafts were accepted and rejected, many times
        assert metrics.accepted_drafts > 500 and metrics.verified_drafts - metrics.accepted_drafts > 500, metrics
        assert len(metrics.position_accepts) >= 2 and metrics.position_accepts[1] > 100, metrics
    if config == "adaptive-hardware-aware":  # both kinds of round, decided from the history
        decisions = policy.gate.decisions
        assert 0 < metrics.drafting_rounds < metrics.rounds and True in decisions and False in decisions, metrics
    assert_fits(index, sequence_distribution(hf, SAMPLED_PROMPT, temperature), f"engine {config}", epsilon=0.05)


@pytest.mark.parametrize("truncation", [dict(top_k=2), dict(top_p=0.7, min_p=0.1)])
def test_sampled_lossless_with_truncation(small, truncation):
    """Requests with top-k / top-p / min-p: the target distribution is the
    truncated one, the drafter samples its own truncated distribution, and
    the first 4 tokens of 13500 requests follow the enumerated truncated
    sequence distribution (81 cells, power >= 0.99 against TV 0.05)."""
    hf, target = small
    drafter = random_drafter(target, rank=16, block=3, scale=0.5, seed=2)
    index, metrics = sample_sequences(target, drafter, Fixed(), 1.0, **truncation)
    assert metrics.accepted_drafts > 500 and metrics.verified_drafts - metrics.accepted_drafts > 500, metrics
    want = sequence_distribution(hf, SAMPLED_PROMPT, 1.0, **truncation)
    assert (want == 0).any(), "the truncation must remove sequences for the test to mean anything"
    assert_fits(index, want, f"engine {truncation}", epsilon=0.05)


def test_logprobs_of_generated_tokens(llama):
    """Greedy: log-probabilities of the untruncated softmax at temperature 1,
    the same with and without the drafter, equal to transformers' log-softmax
    along the sequence; sampled with top-k: log p under the truncation."""
    prompts = PROMPTS[:3]
    drafter = llama.bigram_drafter(prompts)
    params = [SamplingParams(temperature=0.0, max_new_tokens=12, logprobs=True),
              SamplingParams(temperature=0.9, max_new_tokens=12, logprobs=True, top_k=5, seed=3),
              SamplingParams(temperature=0.0, max_new_tokens=12)]
    plain = SpeculativeEngine(llama.target, None, max_concurrency=3, max_model_len=80).generate(prompts, params)
    spec = SpeculativeEngine(llama.target, drafter, max_concurrency=3, max_model_len=80).generate(prompts, params)
    assert spec[2].logprobs is None and len(spec[0].logprobs) == len(spec[0].tokens) == 12
    torch.testing.assert_close(torch.tensor(spec[0].logprobs), torch.tensor(plain[0].logprobs), atol=1e-4, rtol=0)
    for r, prompt, T, k in ((spec[0], prompts[0], None, 0), (spec[1], prompts[1], 0.9, 5),
                            (plain[1], prompts[1], 0.9, 5)):
        seq = torch.tensor([prompt + r.tokens])
        with torch.no_grad():
            logits = llama.hf(seq).logits[0, len(seq[0]) - len(r.tokens) - 1:-1].double()
        for j, token in enumerate(r.tokens):
            if T is None:
                want = torch.log_softmax(logits[j], -1)[token]
            else:
                want = torch.log(reference._truncated_softmax2(logits[j].float(), T, k, 1.0, 0.0)[token])
            assert abs(r.logprobs[j] - float(want)) < 1e-3, (j, r.logprobs[j], float(want))


def test_bad_truncation_parameters_are_request_errors(llama):
    engine = SpeculativeEngine(llama.target, None, max_concurrency=2, max_model_len=80)
    bad = [SamplingParams(top_k=-1), SamplingParams(top_k=10**9), SamplingParams(top_p=0.0),
           SamplingParams(min_p=1.5), SamplingParams(top_p=float("nan"))]
    results = engine.generate([PROMPTS[0]] * len(bad), bad)
    assert all(r.finish_reason == "error" for r in results)
    assert "top_k" in results[0].error and "top_p" in results[2].error and "min_p" in results[3].error


def test_sampled_test_catches_a_biased_engine(small, monkeypatch):
    """The same test rejects an engine whose acceptance step samples at a wrong
    temperature (a 30% error): it has teeth."""
    hf, target = small
    original = dspark.ops.rejection_sample

    def biased(*args, temperature, **kwargs):
        return original(*args, temperature=temperature * 1.3, **kwargs)

    monkeypatch.setattr(dspark.ops, "rejection_sample", biased)
    drafter = random_drafter(target, rank=16, block=3, scale=0.5, seed=2)
    index, _ = sample_sequences(target, drafter, Fixed(), 1.0)
    assert_rejects(index, sequence_distribution(hf, SAMPLED_PROMPT, 1.0), "biased engine")


def test_sampling_is_reproducible_and_seeded(llama):
    drafter = random_drafter(llama.target, scale=0.3)
    params = [SamplingParams(temperature=t, max_new_tokens=16, seed=s) for t, s in [(1.0, 1), (0.7, 2), (1.3, 1)]]
    prompts = PROMPTS[:3]
    a = SpeculativeEngine(llama.target, drafter, max_concurrency=3).generate(prompts, params)
    b = SpeculativeEngine(llama.target, drafter, max_concurrency=3).generate(prompts, params)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    params[0] = SamplingParams(temperature=1.0, max_new_tokens=16, seed=9)
    c = SpeculativeEngine(llama.target, drafter, max_concurrency=3).generate(prompts, params)
    assert c[0].tokens != a[0].tokens and c[1].tokens == a[1].tokens


# ----------------------------------------------------------------- metrics


def test_metrics_and_calibration_recorder(llama):
    drafter = llama.bigram_drafter(PROMPTS)
    recorder = CalibrationRecorder()
    engine = SpeculativeEngine(llama.target, drafter, policy=Threshold(0.3), max_concurrency=6, max_model_len=64,
                               recorder=recorder)
    results = engine.generate(PROMPTS, greedy())
    m = engine.metrics
    assert m.generated_tokens == sum(len(r.tokens) for r in results) == 16 * MAX_NEW
    assert m.request_rounds == sum(r.metrics.rounds for r in results)
    for r in results:  # one token from the prefill, then accepted + 1 per round
        assert len(r.tokens) == 1 + r.metrics.rounds + r.metrics.accepted
        assert r.metrics.accepted <= r.metrics.drafted_verified
    assert m.tau == pytest.approx((m.accepted_drafts + m.request_rounds) / m.request_rounds)
    assert m.tokens_per_second > 0 and m.rounds <= m.request_rounds
    # position-wise conditional acceptance, against what the recorder saw
    logits, accepted, observed = recorder.data()
    assert logits.shape[0] == m.request_rounds
    for k in range(accepted.shape[1]):
        tried = observed[:, k] & (accepted[:, k - 1] if k else True)
        trials = m.position_trials[k] if k < len(m.position_trials) else 0
        accepts = m.position_accepts[k] if k < len(m.position_accepts) else 0
        assert trials == int(tried.sum()) and accepts == int((tried & accepted[:, k]).sum())
        # prefix acceptance (DeepSpec's accept_rate@k): among rounds that verified k + 1 drafts,
        # those whose drafts 1..k+1 were all accepted
        verified = observed[:, k]
        all_accepted = accepted[:, : k + 1].all(dim=1)
        trials = m.prefix_trials[k] if k < len(m.prefix_trials) else 0
        accepts = m.prefix_accepts[k] if k < len(m.prefix_accepts) else 0
        assert trials == int(verified.sum()) and accepts == int((verified & all_accepted).sum())
    sts, _ = recorder.fit()
    assert len(sts.temperatures) == drafter.block_size


def test_prefix_and_conditional_acceptance_definitions():
    """The two per-position rates on hand-made rounds (verified, accepted):
    conditional at k = accepted >= k among rounds with verified >= k and
    accepted >= k - 1; prefix at k (DeepSpec's accept_rate@(k-1), computed as
    its evaluator does from proposal and accepted lengths) = accepted >= k
    among rounds with verified >= k."""
    rounds = [(3, 3), (3, 0), (3, 1), (2, 2), (1, 0), (0, 0), (3, 2)]
    m = RunMetrics()
    m.record([v for v, _ in rounds], [a for _, a in rounds])
    gamma = 3
    # DeepSpec's evaluator: proposals_at_pos[i] += proposal_length > i; accepted_at_pos[i] += accepted > i
    proposals = [sum(v > i for v, _ in rounds) for i in range(gamma)]
    accepted_at = [sum(a > i for _, a in rounds) for i in range(gamma)]
    assert m.prefix_acceptance_by_position == pytest.approx([a / p for a, p in zip(accepted_at, proposals)])
    assert m.prefix_acceptance_by_position == pytest.approx([4 / 6, 3 / 5, 1 / 4])
    assert m.acceptance_by_position == pytest.approx([4 / 6, 3 / 4, 1 / 2])
    assert m.tau == pytest.approx((8 + 7) / 7)
    d = m.as_dict()
    assert d["prefix_acceptance_by_position"] == pytest.approx([4 / 6, 3 / 5, 1 / 4])
    empty = RunMetrics()
    empty.record([2], [0])
    assert empty.as_dict()["acceptance_by_position"] == [0.0, None]  # JSON-safe: no nan
    assert empty.as_dict()["prefix_acceptance_by_position"] == [0.0, 0.0]


# --------------------------------------------------------------- bad input


def test_bad_requests_do_not_lose_the_others(llama):
    drafter = llama.bigram_drafter(PROMPTS)
    engine = SpeculativeEngine(llama.target, drafter, max_concurrency=4, max_model_len=64, page_size=8, num_pages=20)
    good = PROMPTS[:6]
    prompts = [good[0], [], good[1], [5, VOCAB], good[2], [1] * 41, good[3], good[4], good[5], [3, 4]]
    params = [greedy()] * len(prompts)
    params[-1] = SamplingParams(temperature=-1.0)
    results = engine.generate(prompts, params)
    errors = {i: r.error for i, r in enumerate(results) if r.finish_reason == "error"}
    assert set(errors) == {1, 3, 5, 9}
    assert "empty prompt" in errors[1]
    assert "outside the vocabulary" in errors[3]
    assert "exceeds max_model_len 64" in errors[5]
    assert "temperature" in errors[9]
    assert_matches(llama, good, [results[i] for i in (0, 2, 4, 6, 7, 8)])
    # a cache too small for one request: that request fails, the others run
    tiny = SpeculativeEngine(llama.target, drafter, max_concurrency=4, max_model_len=64, page_size=8, num_pages=7)
    assert max(len(p) for p in good[:2]) + MAX_NEW + 5 <= 7 * 8
    results = tiny.generate([good[0], [2] * 30, good[1]], greedy())
    assert results[1].finish_reason == "error" and "more than the cache holds" in results[1].error
    assert_matches(llama, [good[0], good[1]], [results[0], results[2]])


def test_bad_engine_arguments(llama):
    drafter = random_drafter(llama.target, confidence=False)
    with pytest.raises(ValueError, match="gamma must be in"):
        SpeculativeEngine(llama.target, drafter, gamma=5)
    with pytest.raises(ValueError, match="needs a drafter with a confidence head"):
        SpeculativeEngine(llama.target, drafter, policy=Threshold(0.5))
    with pytest.raises(ValueError, match="max_concurrency"):
        SpeculativeEngine(llama.target, drafter, max_concurrency=0)
    with pytest.raises(TypeError, match="policy"):
        SpeculativeEngine(llama.target, drafter, policy="fixed")
    with pytest.raises(ValueError, match="2 prompts but 3"):
        SpeculativeEngine(llama.target).generate([[1], [2]], [greedy()] * 3)


def test_profile_sps_measures_every_batch_size_and_the_drafting(llama):
    drafter = random_drafter(llama.target)
    engine = SpeculativeEngine(llama.target, drafter, max_concurrency=3)
    table = engine.profile_sps(warmup=0, repeats=2)
    assert table.max_batch_tokens == 3 * 5
    assert all(v > 0 for v in table.steps_per_second[1:])
    assert len(table.draft_seconds) == 4 and table.draft_seconds[0] == 0.0
    assert all(t > 0 for t in table.draft_seconds[1:])
    assert len(table.spread) == table.max_batch_tokens + 1 and table.meta["gamma"] == 4
    assert engine.profile_sps(warmup=0, repeats=1, draft=False).draft_seconds == []


# ------------------------------------------------------- adaptive drafting

# A plain step costs 10 ms at any batch; drafting a round costs 2 ms more: a
# drafting round pays when it commits more than 1.2 tokens per request (the
# bigram drafter commits about 2, a useless one 1).
GATED = SPSTable.from_curve(lambda b: 100.0, 256, draft_curve=lambda r: 0.002, max_requests=16)


def test_adaptive_drafting_switches_both_ways_and_stays_lossless(llama):
    """A good drafter (the bigram head), then the same drafter made useless
    (its Markov head zeroed), then good again: the gate drafts, stops drafting
    (plain steps and a few probes), and resumes; every output equals the
    target's greedy one."""
    prompts = PROMPTS[:6]
    drafter = llama.bigram_drafter(prompts)
    good_w2 = drafter.markov_head.markov_w2.weight.detach().clone()
    gate = DraftGate(GATED, memory=0.9, probe_min=2, probe_max=8, probe_budget=0.0, margin=0.0, measured=False)
    policy = HardwareAware(GATED, gate=gate)
    engine = SpeculativeEngine(llama.target, drafter, policy=policy, max_concurrency=3, max_model_len=80)
    runs = []
    for useless in (False, True, False):
        with torch.no_grad():
            drafter.markov_head.markov_w2.weight.copy_(torch.zeros_like(good_w2) if useless else good_w2)
        results = engine.generate(prompts, greedy())
        assert_matches(llama, prompts, results)
        runs.append(list(policy.gate.decisions))
    good, bad, again = runs
    assert sum(good) / len(good) > 0.9, good
    assert sum(bad) / len(bad) < 0.4 and bad[-8:].count(True) <= 2, bad
    # (the run's last round may be a plain step: with one token left, drafting cannot shorten the drain)
    assert again[-5:-1] == [True] * 4 and sum(again) / len(again) > 0.6, again


def test_engine_tells_the_policy_which_requests_and_when_the_batch_drains(llama):
    """Before each round the policy hears the batch's request ids and, once no
    request waits for admission, each one's remaining budget (max_new_tokens
    minus the tokens read so far); what a drafting round taught it comes with
    the ids of the requests it came from. Greedy output is still the target's
    with the gate weighing the drain."""
    prompts = PROMPTS[:5]
    drafter = llama.bigram_drafter(prompts)

    class Recording(HardwareAware):
        def __init__(self):
            super().__init__(GATED, gate=DraftGate(GATED, probe_min=1, probe_max=2, probe_budget=0.0))
            self.rounds, self.observed = [], []

        def before_round(self, requests, remaining):
            self.rounds.append((list(requests), None if remaining is None else list(remaining)))
            super().before_round(requests, remaining)

        def observe_requests(self, requests, lengths, accepted):
            self.observed.append((list(requests), len(lengths), len(accepted)))
            super().observe_requests(requests, lengths, accepted)

    policy = Recording()
    engine = SpeculativeEngine(llama.target, drafter, policy=policy, max_concurrency=2, max_model_len=80)
    results = engine.generate(prompts, greedy())
    assert_matches(llama, prompts, results)
    draining = [i for i, (_, remaining) in enumerate(policy.rounds) if remaining is not None]
    assert draining and draining == list(range(draining[0], len(policy.rounds)))  # once it drains, it drains
    assert 4 in policy.rounds[draining[0]][0]  # the last request is in
    assert all(len(ids) <= 2 and len(set(ids)) == len(ids) for ids, _ in policy.rounds)
    for ids, remaining in policy.rounds[draining[0]:]:
        assert len(remaining) == len(ids) and all(0 <= n <= MAX_NEW for n in remaining)
    # the budgets go down between rounds of the same request
    last: Dict[int, int] = {}
    for ids, remaining in policy.rounds[draining[0]:]:
        for i, n in zip(ids, remaining):
            assert n <= last.get(i, MAX_NEW)
            last[i] = n
    assert policy.observed and all(n == m == len(ids) and set(ids) <= set(range(5)) for ids, n, m in policy.observed)
    assert set(policy.gate._requests) <= set(policy.rounds[-1][0])  # a request gone is forgotten
    engine.generate(prompts[:1], greedy())  # the next run starts without the last one's requests
    assert set(policy.gate._requests) <= {0} and all(r is not None for _, r in policy.rounds[-3:])


def test_engine_reports_each_round_time_to_the_policy(llama):
    """Every verified round is reported once (observe_round) with its kind, the
    requests drafted or stepped (a drafting round counts the requests drafted,
    some of which may finish before verification), the tokens verified
    (requests + drafts) and a positive wall time; greedy output is still the target's with the gate
    deciding from measured times."""
    prompts = PROMPTS[:4]
    drafter = llama.bigram_drafter(prompts)

    class Recording(HardwareAware):
        def __init__(self):
            super().__init__(GATED, gate=DraftGate(GATED, probe_min=1, probe_max=2, probe_budget=0.0))
            self.rounds = []
            self.lengths = []
            self.observed = []

        def __call__(self, conf, cap=None, validate=True):
            lengths = super().__call__(conf, cap, validate)
            self.lengths.append(lengths.tolist())
            return lengths

        def observe_round(self, drafted, requests, batch_tokens, seconds):
            self.rounds.append((drafted, requests, batch_tokens, seconds))
            super().observe_round(drafted, requests, batch_tokens, seconds)

        def observe(self, lengths, accepted):
            self.observed.append(len(lengths))
            super().observe(lengths, accepted)

    policy = Recording()
    engine = SpeculativeEngine(llama.target, drafter, policy=policy, max_concurrency=2, max_model_len=80)
    results = engine.generate(prompts, greedy())
    assert_matches(llama, prompts, results)
    m = engine.metrics
    assert len(policy.rounds) == m.rounds and sum(d for d, *_ in policy.rounds) == m.drafting_rounds > 0
    assert all(seconds > 0 and 1 <= R <= 2 and B >= R for _, R, B, seconds in policy.rounds)
    assert all(B == R for drafted, R, B, _ in policy.rounds if not drafted)
    assert sum(B for *_, B, _ in policy.rounds) == m.request_rounds + m.verified_drafts  # every row verified
    assert policy.gate._time_weight[1] > 0  # the gate took the drafting rounds' times
    # the requests whose last rounds were bound by their token budget are not learnt from
    assert 0 < sum(policy.observed) < m.request_rounds - (m.rounds - m.drafting_rounds)


class DraftOn(Fixed):
    """Fixed, drafting only in the rounds (counted from 1) that ``rule`` picks."""

    def __init__(self, rule):
        super().__init__()
        self.rule, self.calls = rule, 0

    def draft_requests(self, num_requests):
        self.calls += 1
        return num_requests if self.rule(self.calls) else 0


def test_plain_steps_extend_the_drafter_context_like_drafting_rounds(llama, monkeypatch):
    """Plain rounds do no drafter work: their committed positions wait and are
    written into the drafter's context in one batch before the next draft or
    admission. After that write the context cache of a run of plain steps (the
    gate off after the first round) holds the same keys and values, position
    for position, as after a run that drafted every round."""

    class FirstRoundOnly(DraftOn):
        def __init__(self):
            super().__init__(lambda call: call == 1)

    prompt = PROMPTS[2]
    drafter = llama.bigram_drafter([prompt])
    writes = []
    extend = type(drafter).extend_context
    monkeypatch.setattr(type(drafter), "extend_context", lambda self, *a: writes.append(1) or extend(self, *a))
    caches = []
    for policy in (Fixed(), FirstRoundOnly()):
        writes.clear()
        engine = SpeculativeEngine(llama.target, drafter, policy=policy, max_concurrency=1, max_model_len=80)
        result = engine.generate([prompt], greedy())[0]
        assert result.tokens == llama.reference(prompt)
        if isinstance(policy, FirstRoundOnly):
            assert len(writes) == 2  # the prefill and the one drafting round; the plain rounds wait
            engine._flush_context()
            assert len(writes) == 3 and not engine._deferred_context
        cache = engine.draft_cache
        positions = torch.arange(len(prompt) + len(result.tokens) - 1)
        slots = cache.slots(torch.zeros_like(positions), positions)
        flat = lambda t: t.reshape(t.shape[0], -1, *t.shape[3:])[:, slots]  # noqa: E731
        caches.append((flat(cache.k), flat(cache.v), engine.metrics.drafting_rounds))
    (k_all, v_all, drafted_all), (k_plain, v_plain, drafted_plain) = caches
    assert drafted_plain == 1 and drafted_all > 1
    torch.testing.assert_close(k_plain, k_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_plain, v_all, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------- command line


def write_tokenizer(folder, vocab: int) -> None:
    """A word-level tokenizer over the words w0 .. w{vocab-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def test_generate_command(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from dspark.cli import main

    hf = hf_model(tmp_path / "t", vocab=VOCAB)
    write_tokenizer(tmp_path / "t", VOCAB)
    target = TargetModel.load(tmp_path / "t")
    random_drafter(target, scale=0.3).save(tmp_path / "d", target)
    prompts = ["w5 w17 w3 w99", "w1 w2"]
    for extra in ([], ["--draft", str(tmp_path / "d")], ["--draft", str(tmp_path / "d"), "--policy", "async"]):
        code = main(["generate", "--target", str(tmp_path / "t"), "--prompt", prompts[0], "--prompt", prompts[1],
                     "--max-new-tokens", "12", "--dtype", "float32", "--no-progress", "--json", str(tmp_path / "out.json")] + extra)
        captured = capsys.readouterr()
        out = captured.out
        assert code == 0, captured.err
        for text in prompts:
            ids = [int(w[1:]) for w in text.split()]
            expected = " ".join(f"w{t}" for t in hf_greedy(hf, ids, 12))
            assert expected in out
        assert "tok/s" in out and "tau" in out
        if extra:
            assert "position-wise conditional acceptance" in out and "position-wise prefix acceptance" in out
    import json

    saved = json.loads((tmp_path / "out.json").read_text())
    assert len(saved["results"]) == 2 and saved["metrics"]["generated_tokens"] == 24
    assert len(saved["metrics"]["prefix_acceptance_by_position"]) == len(saved["metrics"]["acceptance_by_position"])
    # a bad drafter folder: a clear message, exit code 2
    assert main(["generate", "--target", str(tmp_path / "t"), "--draft", str(tmp_path / "nowhere"),
                 "--prompt", "w1"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_deferred_context_is_written_before_requests_join(llama, monkeypatch):
    """Requests finish and others take their pages while the rounds alternate
    between drafting and plain steps: the deferred context of the plain rounds
    is written before any admission (a finished request's pages may go to the
    newcomer) and before every draft, and every output still equals the
    target's greedy text."""

    class EveryThirdRound(DraftOn):
        def __init__(self):
            super().__init__(lambda call: call % 3 == 0)

    drafter = llama.bigram_drafter(PROMPTS)
    policy = EveryThirdRound()
    admitted, drafted = [], []
    admit, draft = SpeculativeEngine._admit, SpeculativeEngine._draft

    def checked_admit(self, queue, free_slots, results):
        joined = admit(self, queue, free_slots, results)
        if joined is not None:
            admitted.append(len(self._deferred_context))
        return joined

    def checked_draft(self, state, *args, **kwargs):
        out = draft(self, state, *args, **kwargs)
        drafted.append(len(self._deferred_context))
        return out

    monkeypatch.setattr(SpeculativeEngine, "_admit", checked_admit)
    monkeypatch.setattr(SpeculativeEngine, "_draft", checked_draft)
    lengths = [6 + 2 * i for i in range(len(PROMPTS))]  # requests leave at different rounds
    engine = SpeculativeEngine(llama.target, drafter, policy=policy, max_concurrency=2,
                               max_model_len=max(map(len, PROMPTS)) + max(lengths) + 1)
    results = engine.generate(PROMPTS, [SamplingParams(temperature=0.0, max_new_tokens=n) for n in lengths])
    for prompt, result, n in zip(PROMPTS, results, lengths):
        assert result.tokens == llama.reference(prompt, n)
    m = engine.metrics
    assert 0 < m.drafting_rounds < m.rounds
    assert len(admitted) > 2 and set(admitted) == {0} and set(drafted) == {0}


class DraftCycle(Fixed):
    """Fixed, drafting round after round for all requests, a third, one, none,
    half of them (a probe drafts for the most recently admitted)."""

    def __init__(self):
        super().__init__()
        self.calls, self.asked, self.observed = 0, [], []

    def draft_requests(self, num_requests):
        self.calls += 1
        n = [num_requests, num_requests // 3, 1, 0, num_requests // 2][self.calls % 5]
        self.asked.append((num_requests, n))
        return n

    def observe(self, lengths, accepted):
        self.observed.append(len(lengths))


def test_rounds_that_draft_for_some_requests(llama, monkeypatch):
    """Rounds drafting for some of the requests (the most recently admitted),
    requests finishing and joining between them: every output equals the
    target's greedy text; a drafted request's deferred context is written
    before its draft (the others' waits); every committed position reaches the
    drafter's context once, and the context cache ends as after a run that
    drafted every round; the policy learns only from the drafted requests."""
    drafter = llama.bigram_drafter(PROMPTS)
    prompts = PROMPTS[:7]
    lengths = [10 + 3 * i for i in range(len(prompts))]
    params = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in lengths]
    draft, extend = SpeculativeEngine._draft, type(drafter).extend_context
    drafted_states, written = [], []

    def checked_draft(self, state, *args, **kwargs):
        pending = {s for entry in self._deferred_context for s in entry[3]}
        drafted_states.append((state.slots.tolist(), pending))
        return draft(self, state, *args, **kwargs)

    def logged_extend(self, hidden, positions, slots, cache):
        written.extend(int(s) for s in slots.tolist() if s >= 0)
        return extend(self, hidden, positions, slots, cache)

    monkeypatch.setattr(SpeculativeEngine, "_draft", checked_draft)
    monkeypatch.setattr(type(drafter), "extend_context", logged_extend)
    runs = []
    # 3 at a time: requests leave and join between the rounds; 7: all admitted at once, so that both runs give
    # each request the same cache pages and the caches can be compared
    for policy, concurrency in ((DraftCycle(), 3), (Fixed(), 7), (DraftCycle(), 7)):
        drafted_states.clear()
        written.clear()
        engine = SpeculativeEngine(llama.target, drafter, policy=policy, max_concurrency=concurrency,
                                   max_model_len=max(map(len, prompts)) + max(lengths) + 1)
        results = engine.generate(prompts, params)
        for prompt, result, n in zip(prompts, results, lengths):
            assert result.tokens == llama.reference(prompt, n)
        for slots, pending in drafted_states:
            assert not set(slots) & pending  # a drafted request's context is complete
        if isinstance(policy, DraftCycle):
            assert sum(0 < n < R for R, n in policy.asked) >= 5, policy.asked
            assert any(pending for _, pending in drafted_states)  # some requests' context waited
            assert 1 in policy.observed and max(policy.observed) <= concurrency
            assert sum(policy.observed) < engine.metrics.request_rounds
            engine._flush_context()  # what is left after the last round
        runs.append((sorted(written), engine.draft_cache.k.clone(), engine.draft_cache.v.clone()))
    (slots_all, k_all, v_all), (slots_cycle, k_cycle, v_cycle) = runs[1:]
    assert slots_cycle == slots_all  # the same cache slots, each written as often
    index = torch.tensor(sorted(set(slots_all)))
    flat = lambda t: t.reshape(t.shape[0], -1, *t.shape[3:])[:, index]  # noqa: E731
    torch.testing.assert_close(flat(k_cycle), flat(k_all), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat(v_cycle), flat(v_all), atol=1e-5, rtol=1e-5)


def test_a_drafter_used_by_an_engine_can_be_copied(llama, monkeypatch):
    """After an engine packed the drafter's layers and LM head rows (float32
    packing forced on), a deep copy of the target and drafter decodes the same
    tokens in a new engine."""
    import copy

    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "on")
    prompts = PROMPTS[:4]
    drafter = llama.bigram_drafter(prompts, draft_vocab=48)
    engine = SpeculativeEngine(llama.target, drafter, max_concurrency=4, max_model_len=80)
    first = [r.tokens for r in engine.generate(prompts, greedy())]
    target2, drafter2 = copy.deepcopy(llama.target), copy.deepcopy(drafter)
    again = SpeculativeEngine(target2, drafter2, max_concurrency=4, max_model_len=80)
    assert [r.tokens for r in again.generate(prompts, greedy())] == first
