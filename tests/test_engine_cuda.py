"""The engine on the CUDA backend (needs no transformers: the models are built
in memory, and the CPU engine, tested against transformers in test_engine.py,
is the reference)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dspark.engine import SamplingParams, SpeculativeEngine
from dspark.models import Batch, DrafterConfig, DSparkDrafter, TargetConfig, TargetModel
from dspark.scheduler import AsyncHardwareAware, Fixed, HardwareAware, SPSTable, Threshold
from stats import assert_fits

pytestmark = pytest.mark.cuda


def make_target(vocab: int, hidden: int = 64, layers: int = 3, lm_head_scale: float = 1.0, seed: int = 0):
    torch.manual_seed(seed)
    config = TargetConfig.from_dict(dict(
        model_type="qwen3", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_theta=10000.0))
    model = TargetModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
        model.lm_head.weight.mul_(lm_head_scale)
    return model.eval()


def make_drafter(target: TargetModel, head: str = "vanilla", rank: int = 16, block: int = 4, seed: int = 1):
    torch.manual_seed(seed)
    t = target.config
    config = DrafterConfig.from_dict(dict(
        hidden_size=t.hidden_size, intermediate_size=2 * t.hidden_size, num_hidden_layers=1,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
        vocab_size=t.vocab_size, block_size=block, target_layer_ids=[0, t.num_hidden_layers - 1],
        mask_token_id=t.vocab_size - 1, markov_rank=rank, markov_head_type=head, enable_confidence_head=True))
    drafter = DSparkDrafter(config)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return drafter.eval()


def on(model, device):
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    if isinstance(model, TargetModel) and model.config.tie_word_embeddings:
        copy.lm_head.weight = copy.model.embed_tokens.weight
    return copy.to(device).eval()


SPS = SPSTable.from_curve(lambda b: 1000.0 * min(b, 48) / 48 * (0.6 if b in (9, 33) else 1.0), 128)
PROMPTS = [[(7 * i + 3 * j) % 120 for j in range(1 + (5 * i) % 23)] for i in range(12)]


@pytest.mark.parametrize("policy", [Fixed(), Fixed(1), Threshold(0.5), HardwareAware(SPS), AsyncHardwareAware(SPS)],
                         ids=lambda p: p.name)
@pytest.mark.parametrize("head", ["vanilla", "rnn"])
def test_cuda_greedy_equals_cpu(policy, head):
    target = make_target(128)
    drafter = make_drafter(target, head=head)
    params = [SamplingParams(0.0, max_new_tokens=20 - i % 7) for i in range(len(PROMPTS))]
    cpu = SpeculativeEngine(target, None, max_concurrency=5, max_model_len=64).generate(PROMPTS, params)
    engine = SpeculativeEngine(on(target, "cuda"), on(drafter, "cuda"), policy=policy, max_concurrency=5,
                               max_model_len=64)
    gpu = engine.generate(PROMPTS, params)
    assert [r.tokens for r in gpu] == [r.tokens for r in cpu]
    assert engine.metrics.verified_drafts > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_16bit_engine_runs_and_matches_its_target_only_path(dtype):
    """16-bit: speculative greedy output equals the same engine's target-only
    greedy output (the verification forward runs at other batch shapes, so
    equality is checked only where the target's top two logits are apart)."""
    target = on(make_target(128, lm_head_scale=4.0), "cuda").to(dtype)
    drafter = on(make_drafter(make_target(128, lm_head_scale=4.0)), "cuda").to(dtype)
    params = SamplingParams(0.0, max_new_tokens=16)
    base = SpeculativeEngine(target, None, max_concurrency=4).generate(PROMPTS[:8], params)
    spec = SpeculativeEngine(target, drafter, max_concurrency=4).generate(PROMPTS[:8], params)
    same = sum(a.tokens == b.tokens for a, b in zip(base, spec))
    assert same >= 6, [(a.tokens, b.tokens) for a, b in zip(base, spec)]
    assert all(len(r.tokens) == 16 for r in spec)


VOCAB, TOKENS, N = 3, 4, 13500  # 81 sequences: power >= 0.99 against TV 0.05 (stats.py)
PROMPT = [1, 2, 0, 2, 2, 1]


def exact_distribution(target: TargetModel, temperature: float) -> torch.Tensor:
    """P(y_1..y_n | prompt) for all V^n sequences from full-sequence forwards of
    the CPU target (checked against transformers in test_models.py)."""
    probs = torch.ones(1, dtype=torch.float64)
    for step in range(TOKENS):
        rows = [PROMPT + list(p) for p in itertools.product(range(VOCAB), repeat=step)]
        L = len(rows[0])
        cache = target.new_cache(len(rows), L, len(rows), 1)
        for r in range(len(rows)):
            cache.allocate(r, L)
        positions = torch.arange(L).repeat(len(rows))
        requests = torch.arange(len(rows)).repeat_interleave(L)
        batch = Batch(torch.tensor(rows).reshape(-1), positions, torch.arange(0, len(rows) * L + 1, L,
                                                                             dtype=torch.int32),
                      cache.block_table, torch.full((len(rows),), L, dtype=torch.int32), cache.slots(requests, positions))
        last = torch.arange(L - 1, len(rows) * L, L)
        logits = target(batch, cache, logits_rows=last).logits.double()
        probs = (probs.unsqueeze(1) * torch.softmax(logits / temperature, dim=-1)).reshape(-1)
    return probs


def test_cuda_sampled_lossless():
    target = make_target(VOCAB, hidden=32, layers=2, lm_head_scale=2.0, seed=5)
    drafter = make_drafter(target, rank=16, block=3, seed=2)
    sps = SPSTable.from_curve(lambda b: 100.0 * min(b, 900) / 900, 2048)
    engine = SpeculativeEngine(on(target, "cuda"), on(drafter, "cuda"), policy=AsyncHardwareAware(sps),
                               max_concurrency=512, max_model_len=16, seed=3)
    results = engine.generate([PROMPT] * N, SamplingParams(temperature=1.0, max_new_tokens=TOKENS))
    tokens = torch.tensor([r.tokens for r in results])
    index = torch.zeros(N, dtype=torch.int64)
    for i in range(TOKENS):
        index = index * VOCAB + tokens[:, i]
    m = engine.metrics
    assert m.accepted_drafts > 500 and m.verified_drafts - m.accepted_drafts > 500, m
    assert_fits(index, exact_distribution(target, 1.0), "CUDA engine", epsilon=0.05)
