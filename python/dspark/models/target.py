"""Target models of the Llama family, Qwen3 and Gemma 4 (dense, text), over a
paged KV cache.

The forward takes a flattened ragged batch (the tokens of R requests packed
along one dimension with ``cu_q`` offsets) and runs every attention layer with
dspark's ops: ``rope``, ``append_kv`` and ``paged_attention`` (causal, with a
sliding window on Gemma 4's sliding layers). It can return the raw outputs of
chosen decoder layers (before the final norm; layer -1 is the embedding
output), which feed the DSpark drafter's context. Gemma 4's specifics are in
``gemma4.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import _layer_attention
from . import gemma4
from .checkpoint import Checkpoint, Field, check_rope, read_config, size_field, validate_fields, validate_rope
from .common import (CheckpointError, FusingModule, Linear, PagedKVCache, PathLike, RMSNorm, load_state, rope_inv_freq,
                     save_safetensors, softcap)

SUPPORTED = ("llama", "qwen3") + gemma4.MODEL_TYPES

# config.json of a Llama / Qwen3 target, key by key (the rotary settings:
# checkpoint.validate_rope). A missing key or null takes the default.
TARGET_FIELDS = (
    size_field("vocab_size"),
    size_field("hidden_size"),
    size_field("intermediate_size"),
    size_field("num_hidden_layers"),
    size_field("num_attention_heads"),
    size_field("num_key_value_heads", required=False),  # default: num_attention_heads
    size_field("head_dim", required=False),  # default: hidden_size // num_attention_heads
    Field("rms_norm_eps", "real", default=1e-6, positive=True),
    Field("tie_word_embeddings", "bool", default=False),
    Field("attention_bias", "bool", default=False),
)
# The text config of a Gemma 4 target: the keys gemma4.parse reads.
GEMMA4_FIELDS = TARGET_FIELDS[:5] + (
    size_field("num_key_value_heads", required=False),
    size_field("head_dim", required=False),
    Field("rms_norm_eps", "real", default=1e-6, positive=True),
    Field("tie_word_embeddings", "bool", default=True),
    Field("attention_bias", "bool", default=False),
    size_field("global_head_dim", required=False),
    size_field("num_global_key_value_heads", required=False),
    size_field("sliding_window", required=False),
    size_field("num_kv_shared_layers", required=False, low=0),
    size_field("hidden_size_per_layer_input", required=False, low=0),
    size_field("vocab_size_per_layer_input", required=False),
    Field("final_logit_softcapping", "real", positive=True),
    Field("attention_k_eq_v", "bool", default=False),
    Field("use_double_wide_mlp", "bool", default=False),
    Field("enable_moe_block", "bool", default=False),
    Field("hidden_activation", "str"),
    Field("hidden_act", "str"),
    Field("use_bidirectional_attention", "str"),
    Field("layer_types", "str_list"),
    Field("per_layer_config", "object"),
    Field("rope_parameters", "object"),
)


def attention_shape(values: dict, where: str) -> tuple:
    """(heads, kv_heads, head_dim) of validated fields: GQA needs heads to be a
    multiple of kv heads, rotary embedding an even head dim."""
    heads = values["num_attention_heads"]
    kv_heads = values["num_key_value_heads"] or heads
    head_dim = values["head_dim"] or values["hidden_size"] // heads
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                              f"({kv_heads})")
    if head_dim < 2 or head_dim % 2:
        raise CheckpointError(f"{where}: head_dim must be even and >= 2 (rotary embedding), got {head_dim}"
                              + ("" if values["head_dim"] else " (hidden_size // num_attention_heads)"))
    return heads, kv_heads, head_dim


@dataclass
class TargetConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    rope: dict
    raw: dict  # the config.json it came from (saved back as is)
    # Gemma 4 (text): per-layer shapes and options; None for Llama and Qwen3. The
    # fields above then describe the sliding-window layers (head_dim,
    # num_key_value_heads) and the base MLP width.
    gemma4: Optional[gemma4.Gemma4Spec] = None

    @property
    def final_logit_softcapping(self) -> Optional[float]:
        return self.gemma4.final_logit_softcapping if self.gemma4 is not None else None

    @classmethod
    def from_dict(cls, c: dict, where: str = "config.json") -> "TargetConfig":
        """A checked config: every field by type and range (TARGET_FIELDS, or
        GEMMA4_FIELDS for Gemma 4's text config), the attention shape and the
        rotary settings; a CheckpointError names the field."""
        if not isinstance(c, dict):
            raise CheckpointError(f"{where} must be a JSON object, got {type(c).__name__}")
        kind = c.get("model_type")
        if not isinstance(kind, str) or kind not in SUPPORTED:
            raise CheckpointError(f"{where}: unsupported model_type {kind!r}: dspark runs {', '.join(SUPPORTED)}")
        if kind in gemma4.MODEL_TYPES:
            return cls._from_gemma4(c, where)
        v = validate_fields(c, TARGET_FIELDS, where)
        heads, kv_heads, head_dim = attention_shape(v, where)
        return cls(
            model_type=kind, vocab_size=v["vocab_size"], hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"], num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=v["rms_norm_eps"], tie_word_embeddings=v["tie_word_embeddings"],
            attention_bias=v["attention_bias"], rope=validate_rope(c, where), raw=dict(c),
        )

    @classmethod
    def _from_gemma4(cls, c: dict, where: str) -> "TargetConfig":
        if c.get("model_type") == "gemma4" and not isinstance(c.get("text_config"), dict):
            raise CheckpointError(f"{where}: model_type 'gemma4' needs a text_config object, got "
                                  f"{type(c.get('text_config')).__name__}")
        text = c["text_config"] if c.get("model_type") == "gemma4" else c
        v = validate_fields(text, GEMMA4_FIELDS, where)
        for key, entry in (v["per_layer_config"] or {}).items():
            if isinstance(entry, dict):
                validate_fields(entry, (size_field("head_dim", required=False),
                                        size_field("num_key_value_heads", required=False)),
                                f"{where}: per_layer_config[{key!r}]")
        if v["layer_types"] is not None and len(v["layer_types"]) != v["num_hidden_layers"]:
            raise CheckpointError(f"{where}: field 'layer_types' has {len(v['layer_types'])} entries for "
                                  f"num_hidden_layers = {v['num_hidden_layers']}")
        try:
            text, spec = gemma4.parse(c, where)
        except CheckpointError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:  # a field no table covers
            raise CheckpointError(f"{where}: {type(e).__name__}: {e}") from None
        for layer_type, rope in spec.rope.items():
            spec.rope[layer_type] = check_rope(rope, f"{where}: rope_parameters[{layer_type!r}]")
        heads = v["num_attention_heads"]
        return cls(
            model_type="gemma4", vocab_size=v["vocab_size"], hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"], num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=v["num_key_value_heads"] or heads,
            head_dim=int(text["head_dim"]), rms_norm_eps=float(text["rms_norm_eps"]),
            tie_word_embeddings=bool(text["tie_word_embeddings"]), attention_bias=v["attention_bias"],
            rope=dict(spec.rope["sliding_attention"] if "sliding_attention" in spec.rope
                      else spec.rope["full_attention"]),
            raw=dict(c), gemma4=spec,
        )

    def sizes(self) -> Dict[str, int]:
        """The config's sizes that are tensor dimensions of a matching checkpoint."""
        out = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
               "intermediate_size": self.intermediate_size, "num_attention_heads": self.num_attention_heads,
               "head_dim": self.head_dim}
        g = self.gemma4
        if g is not None:
            out.update({f"head_dim of layer {i}": d for i, d in enumerate(g.head_dims)})
            out.update({f"intermediate size of layer {i}": w for i, w in enumerate(g.intermediate_sizes)})
            if g.ple_dim:
                out.update(hidden_size_per_layer_input=g.ple_dim, vocab_size_per_layer_input=g.ple_vocab)
        return out


@dataclass
class TargetOutput:
    logits: Optional[torch.Tensor]  # [n, V] float32 for the requested rows (None: not asked for)
    hidden: Optional[torch.Tensor]  # [T, len(hidden_layers), H] raw decoder-layer outputs
    final: Optional[torch.Tensor] = None  # [n, H] the final-norm outputs of the requested rows, if asked for


@dataclass
class Batch:
    """A flattened ragged batch over a paged cache (all device tensors)."""

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    cu_q: torch.Tensor  # [R + 1] int32
    block_table: torch.Tensor  # [R, max_pages] int32
    kv_lens: torch.Tensor  # [R] int32: keys per request after this batch's tokens are appended
    slots: torch.Tensor  # [T] int64 cache slots (-1: padding)


class Attention(FusingModule):
    def __init__(self, c: TargetConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)  # as paged_attention's default
        self.q_proj = Linear(c.hidden_size, self.heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(self.heads * self.head_dim, c.hidden_size, bias=c.attention_bias)
        if c.model_type == "qwen3":  # per-head norms of q and k, before the rotation
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)

    def fusable(self) -> tuple:
        return self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, batch: Batch, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.project(x)
        q = q.view(T, self.heads, self.head_dim)
        k = k.view(T, self.kv_heads, self.head_dim)
        v = v.view(T, self.kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        out = _layer_attention(q.contiguous(), k.contiguous(), v.contiguous(), k_cache, v_cache, batch.positions,
                               batch.slots, batch.block_table, batch.kv_lens, batch.cu_q, inv_freq, "causal",
                               self.scale)
        return self.o_proj(out.view(T, self.heads * self.head_dim))


class MLP(FusingModule):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def fusable(self) -> tuple:
        return self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, c: TargetConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)


class _Body(nn.Module):  # the "model." prefix of Hugging Face checkpoints
    def __init__(self, c: TargetConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(c) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TargetModel(nn.Module):
    """A Llama / Qwen3 / Gemma 4 causal LM (weights as in a Hugging Face folder)."""

    def __init__(self, config: TargetConfig) -> None:
        super().__init__()
        self.config = config
        self.model = gemma4.Gemma4Body(config) if config.gemma4 is not None else _Body(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # float32 whatever the model's dtype: kept outside the module's buffers
        self._inv_freq = {torch.device("cpu"): rope_inv_freq(config.head_dim, config.rope)}

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, folder: PathLike, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", *, check_finite: bool = True) -> "TargetModel":
        """Loads a Hugging Face folder. Everything is checked before memory is
        allocated: config.json field by field, the safetensors headers against
        their files, the config's sizes against what the files hold, then the
        model built on the meta device against every tensor's name, shape and
        dtype; so the model never takes more memory than its files hold. With
        ``check_finite``, NaN or infinite weights are refused. Any problem is a
        CheckpointError naming the file and the field or tensor."""
        folder = Path(folder)
        where = str(folder / "config.json")
        config = TargetConfig.from_dict(read_config(folder), where)
        checkpoint = Checkpoint(folder)
        checkpoint.bound(config.sizes(), {"num_hidden_layers": config.num_hidden_layers}, where)
        try:
            rope_inv_freq(config.head_dim, config.rope)
            for layer_type, rope in (config.gemma4.rope.items() if config.gemma4 is not None else ()):
                rope_inv_freq(config.gemma4.head_dims[config.gemma4.layer_types.index(layer_type)], rope)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        with torch.device("meta"):
            model = cls(config)
        what = f"target {folder}"
        cls._assign(model, checkpoint.meta_tensors(), what)  # names, shapes and dtypes; nothing allocated
        model = model.to_empty(device="cpu")
        cls._assign(model, checkpoint.load(check_finite=check_finite), what)
        return model.to(device=device, dtype=dtype).eval()

    @staticmethod
    def _assign(model: "TargetModel", tensors: Dict[str, torch.Tensor], what: str) -> None:
        config = model.config
        if config.gemma4 is not None:
            tensors = gemma4.checkpoint_tensors(tensors, config.gemma4)
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        load_state(_Untied(model), tensors, what, config.sizes())
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight

    def save(self, folder: PathLike) -> None:
        """The Hugging Face layout; a Gemma 4 target is written as its text model
        (Gemma4ForCausalLM: a ``gemma4_text`` config, keys ``model.*``)."""
        tensors = dict(self.state_dict())
        if self.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        config = self.config.raw if self.config.gemma4 is None else gemma4.text_only_config(self.config.raw)
        save_safetensors(tensors, folder, config)

    # ------------------------------------------------------------ running

    def new_cache(self, num_pages: int, page_size: int, max_requests: int, max_pages_per_request: int) -> PagedKVCache:
        p = next(self.parameters())
        c = self.config
        shapes = None
        if c.gemma4 is not None:  # per-layer shapes; KV-sharing layers keep no cache
            g = c.gemma4
            shapes = [(g.kv_heads[i], g.head_dims[i]) if g.kv_source[i] == i else None
                      for i in range(c.num_hidden_layers)]
        return PagedKVCache(c.num_hidden_layers, num_pages, page_size, c.num_key_value_heads, c.head_dim, p.dtype,
                            p.device, max_requests, max_pages_per_request, layer_shapes=shapes)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding the first layer reads (Gemma 4: scaled by sqrt(hidden));
        context-feature layer -1."""
        if self.config.gemma4 is not None:
            return self.model.embed(tokens)
        return self.model.embed_tokens(tokens)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: PagedKVCache, hidden_layers: Sequence[int] = (),
                logits_rows: Optional[torch.Tensor] = None, logits: bool = True,
                final_hidden: bool = False) -> TargetOutput:
        """Runs the batch, appending its keys and values to the cache.

        Returns float32 logits of `logits_rows` (all rows by default; none with
        ``logits=False``), the raw outputs of the decoder layers in
        `hidden_layers` for every row, and with ``final_hidden`` the final-norm
        outputs of `logits_rows` (what the LM head reads). Layer -1 in
        `hidden_layers` is the embedding output (DeepSpec's convention)."""
        x = self.embed(batch.tokens)
        wanted = {layer: i for i, layer in enumerate(hidden_layers)}
        kept: Dict[int, torch.Tensor] = {-1: x} if -1 in wanted else {}
        if self.config.gemma4 is not None:
            x = self.model.run(x, batch, cache, wanted, kept)
        else:
            inv_freq = self.inv_freq(x.device)
            for index, layer in enumerate(self.model.layers):
                h = layer.self_attn(layer.input_layernorm(x), batch, inv_freq, cache.k[index], cache.v[index])
                x = x + h
                x = x + layer.mlp(layer.post_attention_layernorm(x))
                if index in wanted:
                    kept[index] = x
        hidden = torch.stack([kept[layer] for layer in hidden_layers], dim=1) if hidden_layers else None
        if logits_rows is not None:
            x = x[logits_rows]
        final = self.model.norm(x)
        out = None
        if logits:
            out = softcap(self.lm_head(final).float(), self.config.final_logit_softcapping)
        return TargetOutput(out, hidden, final if final_hidden else None)


class _Untied(nn.Module):
    """The state-dict view of a target without its tied LM head."""

    def __init__(self, target: TargetModel) -> None:
        super().__init__()
        self.model = target.model
        if not target.config.tie_word_embeddings:
            self.lm_head = target.lm_head
