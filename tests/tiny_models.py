"""Tiny random models for the model and engine tests (built here, no downloads).

Targets are made with ``transformers`` (the reference), saved as Hugging Face
folders and loaded with ``dspark.models``; drafters are made directly in the
DeepSpec layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from dspark.models import DrafterConfig, DSparkDrafter, TargetModel

transformers = __import__("pytest").importorskip("transformers")


def hf_config(kind: str = "llama", vocab: int = 128, hidden: int = 64, layers: int = 3, heads: int = 4,
              kv_heads: int = 2, head_dim: int = 16, tie: bool = False, init: float = 0.1, **extra):
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=1024, tie_word_embeddings=tie, initializer_range=init,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, rms_norm_eps=1e-6, **extra)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common)
    raise ValueError(kind)


def hf_model(folder: Path, kind: str = "llama", seed: int = 0, lm_head_scale: float = 1.0, **config):
    """A random transformers causal LM saved to `folder`; returns it (float32, eval)."""
    torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen3ForCausalLM
    model = cls(hf_config(kind, **config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # random norms too, so they are tested
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        if lm_head_scale != 1.0:
            model.lm_head.weight.mul_(lm_head_scale)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(folder))
    return model


GEMMA4_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                      "sliding_attention", "full_attention"]


def gemma4_config(vocab: int = 128, hidden: int = 64, layers: int = 6, heads: int = 4, kv_heads: int = 2,
                  head_dim: int = 16, global_head_dim: int = 32, global_kv_heads: int = 1, k_eq_v: bool = True,
                  window: int = 4, softcap: float = 3.0, ple: int = 8, shared: int = 2, double_wide: bool = True,
                  tie: bool = True, init: float = 0.1, **extra):
    """A small Gemma 4 text config with every dense feature on by default:
    sliding (window 4) and global layers of other head dims and kv heads,
    keys = values in the global layers, proportional rotary embedding on a
    quarter of the global pairs, soft-capping, per-layer embeddings, two
    KV-sharing layers with double-width MLPs."""
    if not hasattr(transformers, "Gemma4TextConfig"):
        __import__("pytest").skip(f"transformers {transformers.__version__} has no Gemma 4")
    types = (GEMMA4_LAYER_TYPES * layers)[:layers]
    types[-1] = "full_attention"
    return transformers.Gemma4TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, global_head_dim=global_head_dim,
        num_global_key_value_heads=global_kv_heads, attention_k_eq_v=k_eq_v, sliding_window=window,
        layer_types=types, final_logit_softcapping=softcap, hidden_size_per_layer_input=ple,
        vocab_size_per_layer_input=vocab, num_kv_shared_layers=shared, use_double_wide_mlp=double_wide,
        tie_word_embeddings=tie, max_position_embeddings=1024, initializer_range=init, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, rms_norm_eps=1e-6, **extra)


def hf_gemma4_model(folder: Path, seed: int = 0, multimodal: bool = False, **config):
    """A random transformers Gemma 4 text model saved to `folder` (as
    Gemma4ForCausalLM, or inside Gemma4ForConditionalGeneration without vision
    or audio towers); returns the causal LM (float32, eval). Norm weights and
    layer scalars are random too, so that they are tested."""
    torch.manual_seed(seed)
    text = gemma4_config(**config)
    if multimodal:
        text.pad_token_id = 0  # the wrapper's forward masks special tokens with it
        wrapper = transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(
            text_config=text, vision_config=None, audio_config=None,
            tie_word_embeddings=text.tie_word_embeddings)).eval()
        model = wrapper
    else:
        model = transformers.Gemma4ForCausalLM(text).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(folder))
    return model


def drafter_config(target: TargetModel, block: int = 4, rank: int = 16, head: str = "vanilla",
                   confidence: bool = True, with_markov: bool = True, layers: int = 1,
                   layer_ids: Sequence[int] = (0, -1), draft_vocab: int = 0) -> DrafterConfig:
    t = target.config
    ids = sorted({i % t.num_hidden_layers for i in layer_ids})
    return DrafterConfig.from_dict(dict(
        architectures=["DSparkDraftModel"], hidden_size=t.hidden_size, intermediate_size=2 * t.hidden_size,
        num_hidden_layers=layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=1e-6,
        vocab_size=t.vocab_size, rope_theta=10000.0, block_size=block, target_layer_ids=ids,
        mask_token_id=t.vocab_size - 1, markov_rank=rank, markov_head_type=head,
        enable_confidence_head=confidence, confidence_head_with_markov=with_markov, draft_vocab_size=draft_vocab))


def random_drafter(target: TargetModel, seed: int = 1, scale: float = 0.1, **kwargs) -> DSparkDrafter:
    """Random weights; with draft_vocab=N, a draft vocabulary of N random
    target ids in random order."""
    torch.manual_seed(seed)
    drafter = DSparkDrafter(drafter_config(target, **kwargs))
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, scale)
        if drafter.config.draft_vocab_size:
            ids = torch.randperm(drafter.config.vocab_size)[:drafter.config.draft_vocab_size]
            drafter.draft_vocab.copy_(ids.to(torch.int32))
    return drafter.eval()


@torch.no_grad()
def set_bigram(drafter: DSparkDrafter, sequences: Sequence[Sequence[int]], strength: float = 40.0) -> None:
    """Makes the Markov head an exact bigram model of `sequences` (rank = V):
    ``W1 = I`` and ``B(x)[v] = strength`` for the most frequent successor v of x,
    so the drafter proposes what the target tends to say next."""
    V, r = drafter.config.vocab_size, drafter.config.markov_rank
    assert r == V, "set_bigram needs markov_rank == vocab_size"
    counts: Dict[int, Dict[int, int]] = {}
    for seq in sequences:
        for a, b in zip(seq[:-1], seq[1:]):
            counts.setdefault(a, {}).setdefault(b, 0)
            counts[a][b] += 1
    column = {v: v for v in range(V)}
    if drafter.config.draft_vocab_size:  # the most frequent successors make the draft vocabulary
        frequency: Dict[int, int] = {}
        for successors in counts.values():
            for b, n in successors.items():
                frequency[b] = frequency.get(b, 0) + n
        ranked = sorted(range(V), key=lambda v: (-frequency.get(v, 0), v))[:drafter.config.draft_vocab_size]
        drafter.draft_vocab.copy_(torch.tensor(ranked, dtype=torch.int32))
        column = {v: c for c, v in enumerate(ranked)}
    w2 = torch.zeros(drafter.config.draft_columns, V)
    for a, successors in counts.items():
        best = max(successors, key=successors.get)
        if best in column:
            w2[column[best], a] = strength
    head = drafter.markov_head
    head.markov_w1.weight.copy_(torch.eye(V))
    head.markov_w2.weight.copy_(w2)


def hf_greedy(model, prompt: Sequence[int], max_new_tokens: int) -> List[int]:
    out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=max_new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.int64))
    return out[0, len(prompt):].tolist()


def uneven_prompts(count: int, vocab: int, seed: int, low: int = 1, high: int = 40) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def truncate_at_stop(tokens: Sequence[int], stops: Sequence[int]) -> Tuple[List[int], str]:
    for i, t in enumerate(tokens):
        if t in stops:
            return list(tokens[: i + 1]), "stop"
    return list(tokens), "length"
