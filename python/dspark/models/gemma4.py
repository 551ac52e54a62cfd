"""Gemma 4 (dense, text) as a target model, over dspark's paged ops.

What Gemma 4 needs that Llama and Qwen3 do not, as transformers' Gemma 4
computes it:
- RMSNorm in float32 with the weight applied before rounding (GemmaRMSNorm),
  four norms per layer (before and after attention and MLP), q / k norms and a
  weightless value norm;
- the embedding scaled by sqrt(hidden) (rounded to the weights' dtype);
- two layer types: sliding-window layers (``sliding_window`` keys, their own
  head dim, kv heads and rotary settings) and global layers (``global_head_dim``,
  ``num_global_key_value_heads`` when keys equal values, proportional rotary
  embedding on a fraction of the pairs); attention scale 1 (the q / k norms set
  the scale);
- ``attention_k_eq_v``: a global layer's values are its keys' projection (before
  the key norm);
- a learned scalar per layer (``layer_scalar``) on the layer's output;
- a GELU (tanh) MLP, double width in KV-sharing layers with ``use_double_wide_mlp``;
- per-layer embeddings (PLE, ``hidden_size_per_layer_input``): a second
  embedding and a projection of the first one feed a gated residual in every
  layer;
- KV sharing (``num_kv_shared_layers``): the last layers attend to the cache of
  the last earlier layer of their type instead of their own;
- final-logit soft-capping, ``tanh(logits / cap) * cap``.
Mixture-of-experts layers (``enable_moe_block``) and bidirectional text
attention are refused. Checkpoints: ``gemma4_text`` (Gemma4ForCausalLM, keys
``model.*``) and ``gemma4`` (Gemma4ForConditionalGeneration: the
``text_config``, keys ``model.language_model.*``; the vision and audio towers
are not loaded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import ops
from .common import CheckpointError, FusingModule, GemmaRMSNorm, Linear, activation, rope_inv_freq

MODEL_TYPES = ("gemma4", "gemma4_text")
LAYER_TYPES = ("sliding_attention", "full_attention")
TEXT_PREFIX = "model.language_model."  # the text model's keys in a Gemma4ForConditionalGeneration checkpoint


def default_rope_parameters() -> Dict[str, dict]:
    """transformers' defaults for Gemma 4 (a config.json without ``rope_parameters``)."""
    return {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}


@dataclass
class Gemma4Spec:
    """Per-layer shapes and the Gemma 4 options of a target (parsed config)."""

    layer_types: List[str]
    sliding_window: int
    head_dims: List[int]
    kv_heads: List[int]
    k_eq_v: List[bool]  # the layer's values are its key projection
    kv_source: List[int]  # the layer whose cache the layer attends to (itself unless KV-shared)
    intermediate_sizes: List[int]
    hidden_activation: str
    final_logit_softcapping: Optional[float]
    ple_dim: int  # hidden_size_per_layer_input (0: no per-layer embeddings)
    ple_vocab: int
    rope: Dict[str, dict]  # layer type -> rotary parameters
    multimodal: bool  # the checkpoint is a Gemma4ForConditionalGeneration (keys under model.language_model.)

    def window(self, layer: int) -> int:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else 0


def text_config(c: dict) -> Tuple[dict, bool]:
    """The text model's config of a Gemma 4 config.json, and whether it came from
    the multimodal wrapper (``model_type`` ``gemma4`` with a ``text_config``)."""
    if c.get("model_type") == "gemma4":
        text = c.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError("config.json: model_type 'gemma4' without a text_config")
        text = dict(text)
        if "tie_word_embeddings" in c:
            text["tie_word_embeddings"] = c["tie_word_embeddings"]
        return text, True
    return dict(c), False


def layer_head_shapes(c: dict, layer_types: List[str], what: str) -> Tuple[List[int], List[int]]:
    """Head dim and kv heads per layer: sliding layers use ``head_dim`` and
    ``num_key_value_heads``; global layers ``global_head_dim`` (512 unless
    given) and, when keys equal values, ``num_global_key_value_heads`` (as
    transformers reads them), or a ``per_layer_config`` table (layer index or
    layer type -> ``head_dim`` / ``num_key_value_heads``), which newer
    transformers write instead."""
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    dims = [head_dim] * len(layer_types)
    kvs = [kv_heads] * len(layer_types)
    table = c.get("per_layer_config")
    if isinstance(table, dict) and table:
        for key, entry in table.items():
            if not isinstance(entry, dict):
                continue
            if str(key) in LAYER_TYPES:
                layers = [i for i, t in enumerate(layer_types) if t == key]
            else:
                try:
                    layers = [int(key)]
                except ValueError:
                    raise CheckpointError(f"{what}: per_layer_config key {key!r} is not a layer index") from None
            for i in layers:
                if not 0 <= i < len(layer_types):
                    raise CheckpointError(f"{what}: per_layer_config names layer {i} of {len(layer_types)}")
                dims[i] = int(entry.get("head_dim", dims[i]))
                kvs[i] = int(entry.get("num_key_value_heads", kvs[i]))
        return dims, kvs
    global_dim = int(c.get("global_head_dim") or 512)
    global_kv = c.get("num_global_key_value_heads")
    for i, t in enumerate(layer_types):
        if t == "full_attention":
            dims[i] = global_dim
            if c.get("attention_k_eq_v", False) and global_kv is not None:
                kvs[i] = int(global_kv)
    return dims, kvs


def parse(c: dict, what: str = "config.json") -> Tuple[dict, Gemma4Spec]:
    """(the text config, the Gemma 4 spec) of a Gemma 4 config.json, with
    transformers' defaults for the fields it leaves out."""
    text, multimodal = text_config(c)
    try:
        L = int(text["num_hidden_layers"])
        if text.get("enable_moe_block"):
            raise CheckpointError(f"{what}: Gemma 4 mixture-of-experts layers (enable_moe_block) are not supported; "
                                  "dspark runs the dense Gemma 4 text models")
        if text.get("use_bidirectional_attention") == "all":
            raise CheckpointError(f"{what}: use_bidirectional_attention='all' (a bidirectional text model) cannot "
                                  "decode")
        layer_types = text.get("layer_types")
        if layer_types is None:  # transformers' default: 5 sliding layers, then a global one
            layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(L)]
        layer_types = list(layer_types)
        if len(layer_types) != L or any(t not in LAYER_TYPES for t in layer_types):
            raise CheckpointError(f"{what}: layer_types must be {L} of {LAYER_TYPES}, got {layer_types}")
        if layer_types:
            layer_types[-1] = "full_attention"  # as transformers forces it
        dims, kvs = layer_head_shapes(text, layer_types, what)
        k_eq_v = [bool(text.get("attention_k_eq_v", False)) and t == "full_attention" for t in layer_types]
        shared = int(text.get("num_kv_shared_layers") or 0)
        if not 0 <= shared < L or (shared and shared == L):
            raise CheckpointError(f"{what}: num_kv_shared_layers {shared} must be in [0, {L})")
        first_shared = L - shared
        kv_source = list(range(L))
        for i in range(first_shared, L):
            producers = [j for j in range(first_shared) if layer_types[j] == layer_types[i]]
            if not producers:
                raise CheckpointError(f"{what}: KV-shared layer {i} ({layer_types[i]}) has no earlier layer of its "
                                      "type to share with")
            kv_source[i] = producers[-1]
        inter = int(text["intermediate_size"])
        double = bool(text.get("use_double_wide_mlp", False))
        intermediate = [inter * (2 if double and kv_source[i] != i else 1) for i in range(L)]
        rope = text.get("rope_parameters") or default_rope_parameters()
        if not isinstance(rope, dict) or not all(isinstance(rope.get(t), dict) for t in set(layer_types)):
            raise CheckpointError(f"{what}: rope_parameters must give the rotary settings of each layer type "
                                  f"{sorted(set(layer_types))}, got {rope!r}")
        softcap = text.get("final_logit_softcapping")
        spec = Gemma4Spec(
            layer_types=layer_types,
            sliding_window=int(text.get("sliding_window") or 512),
            head_dims=dims,
            kv_heads=kvs,
            k_eq_v=k_eq_v,
            kv_source=kv_source,
            intermediate_sizes=intermediate,
            hidden_activation=str(text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"),
            final_logit_softcapping=float(softcap) if softcap else None,
            ple_dim=int(text.get("hidden_size_per_layer_input", 256) or 0),
            ple_vocab=int(text.get("vocab_size_per_layer_input") or text["vocab_size"]),
            rope={t: dict(rope[t]) for t in LAYER_TYPES if isinstance(rope.get(t), dict)},
            multimodal=multimodal,
        )
    except KeyError as missing:
        raise CheckpointError(f"{what} lacks {missing}") from None
    activation(spec.hidden_activation, what)
    heads = int(text["num_attention_heads"])
    for i in range(L):
        if kvs[i] < 1 or heads % kvs[i]:
            raise CheckpointError(f"{what}: layer {i} has {kvs[i]} kv heads for {heads} query heads")
    text.setdefault("tie_word_embeddings", True)
    text.setdefault("head_dim", 256)
    text.setdefault("rms_norm_eps", 1e-6)
    return text, spec


def text_only_config(raw: dict) -> dict:
    """The config.json of the text model alone (Gemma4ForCausalLM), as dspark
    saves a Gemma 4 target."""
    text, _ = text_config(raw)
    text["model_type"] = "gemma4_text"
    text["architectures"] = ["Gemma4ForCausalLM"]
    return text


def checkpoint_tensors(tensors: Dict[str, torch.Tensor], spec: Gemma4Spec) -> Dict[str, torch.Tensor]:
    """The text model's tensors under dspark's names (``model.*``, ``lm_head.*``):
    the multimodal wrapper's ``model.language_model.`` prefix becomes
    ``model.``, its vision / audio towers are left out, the unused key / value
    weights of KV-shared layers are dropped (as transformers does), and a missing
    ``layer_scalar`` is 1 (transformers' initial value)."""
    out: Dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if spec.multimodal:
            if name.startswith(TEXT_PREFIX):
                out["model." + name[len(TEXT_PREFIX):]] = value
            elif not name.startswith("model."):
                out[name] = value  # lm_head.weight
            continue
        out[name] = value
    for i, source in enumerate(spec.kv_source):
        if source != i:
            for part in ("k_proj", "v_proj", "k_norm", "v_norm"):
                for suffix in (".weight", ".bias"):
                    out.pop(f"model.layers.{i}.self_attn.{part}{suffix}", None)
        out.setdefault(f"model.layers.{i}.layer_scalar", torch.ones(1))
    return out


# ------------------------------------------------------------------ modules


class GatedMLP(FusingModule):
    """``down(act(gate(x)) * up(x))`` (gate and up as one product in CPU
    inference: :class:`~dspark.models.common.FusedLinears`)."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.act = activation(act, "mlp")

    def fusable(self) -> tuple:
        return self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(x)
        return self.down_proj(self.act(gate) * up)


class Gemma4Attention(nn.Module):
    def __init__(self, c, spec: Gemma4Spec, layer: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, spec.kv_heads[layer], spec.head_dims[layer]
        self.window = spec.window(layer)
        self.shared = spec.kv_source[layer] != layer
        d, eps, bias = c.hidden_size, c.rms_norm_eps, c.attention_bias
        self.q_proj = Linear(d, self.heads * self.head_dim, bias=bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, eps)
        if not self.shared:
            self.k_proj = Linear(d, self.kv_heads * self.head_dim, bias=bias)
            if not spec.k_eq_v[layer]:
                self.v_proj = Linear(d, self.kv_heads * self.head_dim, bias=bias)
            self.k_norm = GemmaRMSNorm(self.head_dim, eps)
            self.v_norm = GemmaRMSNorm(self.head_dim, eps, with_scale=False)
        self.o_proj = Linear(self.heads * self.head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, batch, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(T, self.heads, self.head_dim)).contiguous()
        if self.shared:  # the keys and values of this batch are already in the producer layer's cache
            ops.rope(q, None, batch.positions, inv_freq=inv_freq)
        else:
            k = self.k_proj(x).view(T, self.kv_heads, self.head_dim)
            v = self.v_proj(x).view(T, self.kv_heads, self.head_dim) if hasattr(self, "v_proj") else k
            k, v = self.k_norm(k).contiguous(), self.v_norm(v).contiguous()
            ops.rope(q, k, batch.positions, inv_freq=inv_freq)
            ops.append_kv(k, v, k_cache, v_cache, batch.slots, validate=False)
        out = ops.paged_attention(q, k_cache, v_cache, batch.block_table, batch.kv_lens, batch.cu_q, mask="causal",
                                  scale=1.0, window=self.window, validate=False)
        return self.o_proj(out.view(T, self.heads * self.head_dim))


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, c, spec: Gemma4Spec, layer: int) -> None:
        super().__init__()
        d, eps = c.hidden_size, c.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(d, eps)
        self.self_attn = Gemma4Attention(c, spec, layer)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps)
        self.mlp = GatedMLP(d, spec.intermediate_sizes[layer], spec.hidden_activation)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        if spec.ple_dim:
            self.per_layer_input_gate = Linear(d, spec.ple_dim, bias=False)
            self.per_layer_projection = Linear(spec.ple_dim, d, bias=False)
            self.post_per_layer_input_norm = GemmaRMSNorm(d, eps)
            self.act = activation(spec.hidden_activation, "per-layer input")

    def forward(self, x: torch.Tensor, batch, inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                per_layer_input: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), batch, inv_freq, k_cache,
                                                             v_cache))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if per_layer_input is not None:
            h = self.act(self.per_layer_input_gate(x)) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(h))
        return x * self.layer_scalar


class Gemma4Body(nn.Module):
    """The ``model.`` part of a Gemma 4 text checkpoint."""

    def __init__(self, c) -> None:
        super().__init__()
        spec: Gemma4Spec = c.gemma4
        self.spec = spec
        d, L = c.hidden_size, c.num_hidden_layers
        self.embed_tokens = nn.Embedding(c.vocab_size, d)
        self.layers = nn.ModuleList([Gemma4DecoderLayer(c, spec, i) for i in range(L)])
        self.norm = GemmaRMSNorm(d, c.rms_norm_eps)
        self.embed_scale = math.sqrt(d)
        if spec.ple_dim:
            self.embed_tokens_per_layer = nn.Embedding(spec.ple_vocab, L * spec.ple_dim)
            self.per_layer_model_projection = Linear(d, L * spec.ple_dim, bias=False)
            self.per_layer_projection_norm = GemmaRMSNorm(spec.ple_dim, c.rms_norm_eps)
        # float32 rotary frequencies per layer type (head dims differ), per device
        self._inv_freq: Dict[Tuple[str, torch.device], torch.Tensor] = {}
        for t in set(spec.layer_types):
            dim = spec.head_dims[spec.layer_types.index(t)]
            self._inv_freq[(t, torch.device("cpu"))] = rope_inv_freq(dim, spec.rope[t])

    def inv_freq(self, layer_type: str, device: torch.device) -> torch.Tensor:
        key = (layer_type, torch.device(device))
        if key not in self._inv_freq:
            self._inv_freq[key] = self._inv_freq[(layer_type, torch.device("cpu"))].to(device)
        return self._inv_freq[key]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The scaled embedding (the scale rounded to the weights' dtype first, as transformers does)."""
        x = self.embed_tokens(tokens)
        return x * torch.tensor(self.embed_scale, dtype=torch.float32).to(x.dtype).item()

    def per_layer_inputs(self, tokens: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``[T, L, ple_dim]``: the token's per-layer embedding and a projection of
        its (scaled) embedding, averaged as transformers combines them."""
        spec = self.spec
        if not spec.ple_dim:
            return None
        T, L = tokens.shape[0], len(self.layers)
        table = self.embed_tokens_per_layer(tokens)
        table = table * torch.tensor(math.sqrt(spec.ple_dim), dtype=torch.float32).to(table.dtype).item()
        projection = self.per_layer_model_projection(x) * (x.shape[-1] ** -0.5)
        projection = self.per_layer_projection_norm(projection.view(T, L, spec.ple_dim))
        return (projection + table.view(T, L, spec.ple_dim)) * (2.0 ** -0.5)

    def run(self, x: torch.Tensor, batch, cache, wanted: Dict[int, int], kept: Dict[int, torch.Tensor]) -> torch.Tensor:
        spec = self.spec
        ple = self.per_layer_inputs(batch.tokens, x)
        for index, layer in enumerate(self.layers):
            source = spec.kv_source[index]
            x = layer(x, batch, self.inv_freq(spec.layer_types[index], x.device), cache.k[source], cache.v[source],
                      ple[:, index] if ple is not None else None)
            if index in wanted:
                kept[index] = x
        return x
