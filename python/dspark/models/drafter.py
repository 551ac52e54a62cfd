"""The DSpark drafter in the format of the public DeepSpec checkpoints.

A parallel backbone (DFlash-style) turns a block ``[anchor, mask * (gamma-1)]``
into hidden states ``h_1..h_gamma`` and base logits ``U`` (the target's LM
head), attending to context keys and values computed from the target's
hidden states (the chosen layers concatenated, ``fc``, ``hidden_norm``, then
each layer's own ``k_proj`` / ``v_proj`` with ``k_norm`` and rotary at the
context positions) and kept in the drafter's own paged cache. The block's
own keys are written to the cache for the round only (``block`` mask: every
block query sees the whole context before the anchor and the whole block).
The Markov head and the confidence head run through dspark.ops. A
``markov_rank = 0`` checkpoint is a DFlash-style drafter.

Two forms, as DeepSpec writes them: Qwen3DSparkModel (Qwen3 layers: RMSNorm,
q / k norms, SwiGLU; the form dspark trains for any target) and
Gemma4DSparkModel (Gemma 4 layers: Gemma RMSNorm before and after attention
and MLP, q / k / weightless v norms, attention scale 1, keys = values with
``attention_k_eq_v``, the global layers' head dim and rotary settings, layer
scalars, GELU MLP, soft-capped logits).

Embedding and LM head: DeepSpec's drafter holds frozen copies of the target's
(``embed_tokens.weight``, ``lm_head.weight``). Loaded with its target, a
drafter whose copies equal the target's weights (in the checkpoint's dtype, to
within one unit in the last place) drops them and uses the target's: no extra
memory. Copies that differ are refused with a CheckpointError naming the
largest difference, unless ``embeddings="own"`` asks for the drafter's own
copies (then kept and used for drafting; verification always uses the target,
so decoding stays exact either way). Loaded without a target, the copies are
kept and used. ``save`` writes the copies (the drafter's own, or its target's)
so that DeepSpec's loader, which needs them, reads the folder.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import ops
from ..calibration import STS
from ..ops.attention import _layer_attention
from . import gemma4
from .checkpoint import (Checkpoint, Field, check_rope, read_config, size_field, validate_fields,
                         validate_rope)
from .common import (CheckpointError, FusingModule, GemmaRMSNorm, Linear, PagedKVCache, PathLike, cpu_weight,
                     RMSNorm, activation, linear, load_state, pack_cpu_linears, rope_inv_freq, save_safetensors,
                     softcap, tensor_version)
from .target import TargetModel, attention_shape

HEADS = ("vanilla", "gated", "rnn")
FORMS = ("qwen3", "gemma4")  # DeepSpec's Qwen3DSparkModel and Gemma4DSparkModel
ARCHITECTURES = {"qwen3": "Qwen3DSparkModel", "gemma4": "Gemma4DSparkModel"}
COPIES = ("embed_tokens.weight", "lm_head.weight")  # DeepSpec's copies of the target's embedding and LM head
DEFAULT_NUM_ANCHORS = 512  # a training setting DeepSpec's loader requires; written when the config has none
MAX_BLOCK_SIZE = 255  # draft positions per round the scheduler handles (csrc/include/dspark/schedule.h)
_ID_LIMIT = (1 << 31) - 1

# config.json of a drafter, key by key. The core keys may sit at the top level
# or in a nested dspark_config / dflash_config (DeepSpec); the top level wins.
DRAFTER_FIELDS = (
    size_field("hidden_size"),
    size_field("intermediate_size"),
    size_field("num_hidden_layers"),
    size_field("num_attention_heads"),
    size_field("num_key_value_heads", required=False),
    size_field("head_dim", required=False),
    Field("rms_norm_eps", "real", default=1e-6, positive=True),
    size_field("vocab_size"),
    Field("block_size", "int", required=True, low=1, high=MAX_BLOCK_SIZE),
    # -1 is the embedding output; the range is checked against the target (check_compatible)
    Field("target_layer_ids", "int_list", required=True, low=-_ID_LIMIT, high=_ID_LIMIT),
    size_field("target_hidden_size", required=False),  # default: hidden_size (or fc.weight's width)
    Field("mask_token_id", "int", required=True, low=0, high=_ID_LIMIT),
    size_field("markov_rank", required=False, default=0, low=0),
    size_field("draft_vocab_size", required=False, default=0, low=0),
    Field("markov_head_type", "str", default="vanilla"),
    Field("enable_confidence_head", "bool", default=False),
    Field("confidence_head_with_markov", "bool", default=True),
    size_field("num_target_layers", required=False),
)
# The DeepSpec keys read at the top level (_deepspec_fields).
DEEPSPEC_FIELDS = (
    Field("model_type", "str"),
    Field("attention_bias", "bool", default=False),
    Field("hidden_act", "str"),
    Field("hidden_activation", "str"),
    Field("layer_types", "str_list"),
    Field("enable_moe_block", "bool", default=False),
    size_field("hidden_size_per_layer_input", required=False, low=0),
    Field("attention_k_eq_v", "bool", default=False),
    size_field("global_head_dim", required=False),
    size_field("num_global_key_value_heads", required=False),
    Field("per_layer_config", "object"),
    Field("rope_parameters", "object"),
    Field("final_logit_softcapping", "real", positive=True),
)


@dataclass
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    block_size: int
    target_layer_ids: List[int]
    target_hidden_size: int
    mask_token_id: int
    markov_rank: int = 0
    draft_vocab_size: int = 0  # 0: the drafter scores the whole vocabulary
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = True
    rope: dict = field(default_factory=lambda: {"rope_theta": 10000.0, "rope_type": "default"})
    raw: dict = field(default_factory=dict)
    # DeepSpec's fields beyond the above (see the README's DeepSpec section)
    form: str = "qwen3"  # "qwen3" or "gemma4" (the layers' kind)
    attention_bias: bool = False
    hidden_act: str = "silu"  # the MLP activation (Gemma 4: hidden_activation)
    attention_k_eq_v: bool = False  # Gemma 4: values are the key projection
    final_logit_softcapping: Optional[float] = None  # Gemma 4: applied to logits of the drafter's own LM head
    num_target_layers: Optional[int] = None  # checked against the target
    intermediate_sizes: Optional[List[int]] = None  # per layer, when they differ (Gemma 4's double-wide MLPs)

    @classmethod
    def from_dict(cls, c: dict, where: str = "drafter config.json") -> "DrafterConfig":
        """A checked config: every field of DRAFTER_FIELDS and DEEPSPEC_FIELDS by
        type and range, the attention shape and the rotary settings; a
        CheckpointError names the field."""
        if not isinstance(c, dict):
            raise CheckpointError(f"{where} must be a JSON object, got {type(c).__name__}")
        nested_key = next((k for k in ("dspark_config", "dflash_config") if c.get(k)), None)
        nested = c.get(nested_key) if nested_key else {}
        if not isinstance(nested, dict):
            raise CheckpointError(f"{where}: field '{nested_key}' must be a JSON object, got {type(nested).__name__}")
        get = lambda key, default=None: c[key] if c.get(key) is not None else nested.get(key, default)  # noqa: E731
        v = validate_fields(c, DRAFTER_FIELDS, where, lookup=get)
        validate_fields(c, DEEPSPEC_FIELDS, where)
        architectures = c.get("architectures")
        if architectures is not None and (not isinstance(architectures, list)
                                          or not all(isinstance(a, str) for a in architectures)):
            raise CheckpointError(f"{where}: field 'architectures' must be a list of strings, got {architectures!r}")
        head_type = v["markov_head_type"].lower()
        if head_type not in HEADS:
            raise CheckpointError(f"{where}: field 'markov_head_type' must be one of {HEADS}, got "
                                  f"{v['markov_head_type']!r}")
        heads, kv_heads, head_dim = attention_shape(v, where)
        if not v["mask_token_id"] < v["vocab_size"]:
            raise CheckpointError(f"{where}: field 'mask_token_id' must be in [0, vocab_size = {v['vocab_size']}), "
                                  f"got {v['mask_token_id']}")
        if not v["draft_vocab_size"] <= v["vocab_size"]:
            raise CheckpointError(f"{where}: field 'draft_vocab_size' must be in [0, vocab_size = {v['vocab_size']}], "
                                  f"got {v['draft_vocab_size']}")
        cfg = cls(
            hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
            num_hidden_layers=v["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, rms_norm_eps=v["rms_norm_eps"], vocab_size=v["vocab_size"],
            block_size=v["block_size"], target_layer_ids=v["target_layer_ids"],
            target_hidden_size=v["target_hidden_size"] or v["hidden_size"], mask_token_id=v["mask_token_id"],
            markov_rank=v["markov_rank"], draft_vocab_size=v["draft_vocab_size"], markov_head_type=head_type,
            enable_confidence_head=v["enable_confidence_head"],
            confidence_head_with_markov=v["confidence_head_with_markov"], raw=dict(c),
        )
        try:
            gemma = "Gemma4DSparkModel" in (architectures or []) or str(c.get("model_type") or "").startswith("gemma4")
            if not gemma:
                cfg.rope = validate_rope(c, where)
            _deepspec_fields(cfg, c, get)
        except CheckpointError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:  # a field no table covers
            raise CheckpointError(f"{where}: {type(e).__name__}: {e}") from None
        if cfg.form == "gemma4":
            cfg.rope = check_rope(cfg.rope, f"{where}: rope_parameters['full_attention']")
            if cfg.num_key_value_heads < 1 or cfg.num_attention_heads % cfg.num_key_value_heads:
                raise CheckpointError(f"{where}: num_attention_heads ({cfg.num_attention_heads}) must be a multiple "
                                      f"of the global layers' kv heads ({cfg.num_key_value_heads})")
            if cfg.head_dim < 2 or cfg.head_dim % 2:
                raise CheckpointError(f"{where}: the global head dim must be even and >= 2, got {cfg.head_dim}")
        return cfg

    def sizes(self) -> Dict[str, int]:
        """The config's sizes that are tensor dimensions of a matching checkpoint
        (the vocabulary is not: the drafter may use its target's embedding)."""
        out = {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
               "num_attention_heads": self.num_attention_heads, "head_dim": self.head_dim,
               "target_hidden_size": self.target_hidden_size, "markov_rank": self.markov_rank,
               "draft_vocab_size": self.draft_vocab_size}
        if self.markov_rank:
            out["vocab_size"] = self.vocab_size  # the Markov head's W1 rows
        return out

    @property
    def draft_columns(self) -> int:
        """Columns of the drafter's logits: the draft vocabulary, or the vocabulary."""
        return self.draft_vocab_size or self.vocab_size

    def to_dict(self) -> dict:
        """config.json as DeepSpec's loaders read it (the fields dspark reads
        rewritten from this config; other fields of the original kept)."""
        out = {k: v for k, v in self.raw.items() if k not in ("dspark_config", "dflash_config")}
        out.update(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            rms_norm_eps=self.rms_norm_eps, vocab_size=self.vocab_size, block_size=self.block_size,
            target_layer_ids=list(self.target_layer_ids),
            target_hidden_size=self.target_hidden_size, mask_token_id=self.mask_token_id,
            markov_rank=self.markov_rank, markov_head_type=self.markov_head_type,
            draft_vocab_size=self.draft_vocab_size,
            enable_confidence_head=self.enable_confidence_head,
            confidence_head_with_markov=self.confidence_head_with_markov,
            architectures=[ARCHITECTURES[self.form]], tie_word_embeddings=False,
            layer_types=["full_attention"] * self.num_hidden_layers, attention_bias=self.attention_bias,
        )
        out.setdefault("num_anchors", DEFAULT_NUM_ANCHORS)
        if self.num_target_layers is not None:
            out["num_target_layers"] = self.num_target_layers
        if not self.draft_vocab_size:
            out.pop("draft_vocab_size", None)  # the DeepSpec layout has no draft vocabulary
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
        if self.form == "gemma4":
            # Gemma4DSparkModel reads the global layers' fields; its layers are all "full_attention"
            rope = dict(out.get("rope_parameters") or gemma4.default_rope_parameters())
            rope["full_attention"] = dict(self.rope)
            out.update(model_type="gemma4_text", global_head_dim=self.head_dim, hidden_activation=self.hidden_act,
                       attention_k_eq_v=self.attention_k_eq_v, final_logit_softcapping=self.final_logit_softcapping,
                       rope_parameters=rope, enable_moe_block=False, hidden_size_per_layer_input=0)
            out.pop("per_layer_config", None)  # the global fields above say the same for every layer
            if self.attention_k_eq_v:
                out["num_global_key_value_heads"] = self.num_key_value_heads
            else:
                out["num_key_value_heads"] = self.num_key_value_heads
        else:
            out.update(model_type="qwen3", head_dim=self.head_dim, num_key_value_heads=self.num_key_value_heads,
                       hidden_act=self.hidden_act, rope_parameters=dict(self.rope))
        return out


def _deepspec_fields(cfg: DrafterConfig, c: dict, get) -> None:
    """The fields of DeepSpec's configs beyond the core ones: the form (Gemma 4
    when the architecture or model type says so), the attention bias, the MLP
    activation, the expected target depth, and for Gemma 4 the global layers'
    head dim, kv heads and rotary settings (Gemma4DSparkModel's layers are all
    global ones), keys = values and soft-capping. Layers DeepSpec would run
    with a sliding window are refused (its trainer never writes them)."""
    architectures = c.get("architectures") or []
    kind = str(c.get("model_type") or "")
    cfg.form = "gemma4" if "Gemma4DSparkModel" in architectures or kind.startswith("gemma4") else "qwen3"
    cfg.attention_bias = bool(c.get("attention_bias", False))
    layers = get("num_target_layers")
    cfg.num_target_layers = int(layers) if layers is not None else None
    if cfg.form == "gemma4":
        if c.get("enable_moe_block") or int(c.get("hidden_size_per_layer_input") or 0):
            raise CheckpointError("Gemma 4 drafter: mixture-of-experts layers and per-layer inputs are not part of "
                                  "DeepSpec's drafter (enable_moe_block, hidden_size_per_layer_input must be off)")
        cfg.attention_k_eq_v = bool(c.get("attention_k_eq_v", False))
        layer_types = ["full_attention"] * cfg.num_hidden_layers
        dims, kvs = gemma4.layer_head_shapes(c, layer_types, "drafter config.json")
        if len(set(dims)) != 1 or len(set(kvs)) != 1:
            raise CheckpointError(f"Gemma 4 drafter: its layers must share one head dim and kv head count, got "
                                  f"{dims} and {kvs}")
        cfg.head_dim, cfg.num_key_value_heads = dims[0], kvs[0]
        rope = c.get("rope_parameters") or gemma4.default_rope_parameters()
        cfg.rope = dict(rope.get("full_attention") or gemma4.default_rope_parameters()["full_attention"])
        cfg.hidden_act = str(c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh")
        cap = c.get("final_logit_softcapping")
        cfg.final_logit_softcapping = float(cap) if cap else None
    else:
        cfg.hidden_act = str(c.get("hidden_act") or "silu")
        layer_types = c.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise CheckpointError(f"drafter config.json: layer_types {layer_types}: sliding-window drafter layers are "
                                  "not supported (DeepSpec's trainer writes full_attention layers)")
    activation(cfg.hidden_act, "drafter config.json")


class DrafterAttention(FusingModule):
    # the block's q / k / v run as one product (block_qkv); the context
    # features' k / v (context_kv) use k_proj and v_proj packed on their own
    keep_members = True

    def __init__(self, c: DrafterConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        gemma = c.form == "gemma4"
        norm = GemmaRMSNorm if gemma else RMSNorm
        bias = c.attention_bias
        self.q_proj = Linear(c.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        if not (gemma and c.attention_k_eq_v):
            self.v_proj = Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.heads * self.head_dim, c.hidden_size, bias=bias)
        self.q_norm = norm(self.head_dim, c.rms_norm_eps)
        self.k_norm = norm(self.head_dim, c.rms_norm_eps)
        if gemma:
            self.v_norm = GemmaRMSNorm(self.head_dim, c.rms_norm_eps, with_scale=False)
        self.scale = 1.0 if gemma else 1.0 / math.sqrt(self.head_dim)

    def context_kv(self, x: torch.Tensor):
        """Keys (normed, not rotated) and values of x [n, d] (context features or
        block states: the same projections)."""
        k = self.k_proj(x)
        return self._kv(k, self.v_proj(x) if hasattr(self, "v_proj") else k)

    def fusable(self) -> tuple:
        return (self.q_proj, self.k_proj) + ((self.v_proj,) if hasattr(self, "v_proj") else ())

    def block_qkv(self, x: torch.Tensor):
        """Queries (normed, not rotated) and :meth:`context_kv` of the same x
        [n, d], the projections as one product where they are fused (CPU
        inference)."""
        projected = self.project(x)
        q, k = projected[0], projected[1]
        q = self.q_norm(q.view(x.shape[0], self.heads, self.head_dim)).contiguous()
        return (q,) + self._kv(k, projected[2] if len(projected) > 2 else k)

    def _kv(self, k: torch.Tensor, v: torch.Tensor):
        """Normed keys and values [n, H_kv, D] of the projections k and v [n, H_kv * D]."""
        n = k.shape[0]
        k = self.k_norm(k.view(n, self.kv_heads, self.head_dim))
        v = v.view(n, self.kv_heads, self.head_dim)
        if hasattr(self, "v_norm"):
            v = self.v_norm(v)
        return k.contiguous(), v.contiguous()


class DrafterLayer(nn.Module):
    def __init__(self, c: DrafterConfig, index: int = 0) -> None:
        super().__init__()
        self.gemma = c.form == "gemma4"
        norm = GemmaRMSNorm if self.gemma else RMSNorm
        width = c.intermediate_sizes[index] if c.intermediate_sizes else c.intermediate_size
        self.input_layernorm = norm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DrafterAttention(c)
        self.post_attention_layernorm = norm(c.hidden_size, c.rms_norm_eps)
        self.mlp = gemma4.GatedMLP(c.hidden_size, width, c.hidden_act)
        if self.gemma:
            self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
            self.register_buffer("layer_scalar", torch.ones(1))

    def after_attention(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The residual stream after the layer, given its attention output."""
        if self.gemma:
            x = x + self.post_attention_layernorm(attention)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return x * self.layer_scalar
        x = x + attention
        return x + self.mlp(self.post_attention_layernorm(x))


class MarkovHead(nn.Module):
    def __init__(self, c: DrafterConfig) -> None:
        super().__init__()
        r, d, V = c.markov_rank, c.hidden_size, c.vocab_size
        self.markov_w1 = nn.Embedding(V, r)  # indexed by target id (the anchor can be any token)
        self.markov_w2 = nn.Linear(r, c.draft_columns, bias=False)
        if c.markov_head_type == "gated":
            self.gate_proj = nn.Linear(d + r, r)
        elif c.markov_head_type == "rnn":
            self.joint_proj = nn.Linear(2 * r + d, 3 * r)


class ConfidenceHead(nn.Module):
    def __init__(self, c: DrafterConfig) -> None:
        super().__init__()
        width = c.hidden_size + (c.markov_rank if c.confidence_head_with_markov and c.markov_rank > 0 else 0)
        self.proj = nn.Linear(width, 1)


@dataclass
class Draft:
    hidden: torch.Tensor  # [R, gamma, d], the backbone's (normed) hidden states
    base_logits: torch.Tensor  # [R, gamma, V]


class DSparkDrafter(nn.Module):
    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        norm = GemmaRMSNorm if c.form == "gemma4" else RMSNorm
        self.fc = Linear(len(c.target_layer_ids) * c.target_hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = norm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList([DrafterLayer(c, i) for i in range(c.num_hidden_layers)])
        self.norm = norm(c.hidden_size, c.rms_norm_eps)
        if c.markov_rank > 0:
            self.markov_head = MarkovHead(c)
        if c.enable_confidence_head:
            self.confidence_head = ConfidenceHead(c)
        if c.draft_vocab_size:
            # the target id of each draft column (distinct ids; saved with the weights)
            self.register_buffer("draft_vocab", torch.arange(c.draft_vocab_size, dtype=torch.int32))
        self.sts: Optional[STS] = None
        self._lm_rows: dict = {}
        self._pack_rows = False
        self._inv_freq = {torch.device("cpu"): rope_inv_freq(c.head_dim, c.rope)}
        self._zero_markov: dict = {}
        # the target this drafter was loaded or bound with (weak: the drafter does not keep it alive)
        object.__setattr__(self, "_target", None)

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, folder: PathLike, target: Optional[TargetModel] = None, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", embeddings: str = "target", *,
             check_finite: bool = True) -> "DSparkDrafter":
        """Loads a drafter folder (DeepSpec's layout, see the module docstring).

        ``embeddings``: what to do with the checkpoint's copies of the target's
        embedding and LM head (``embed_tokens.weight``, ``lm_head.weight``):
        ``"target"`` (default) checks them against ``target``'s weights and uses
        the target's (refusing copies that differ), ``"own"`` keeps and uses the
        drafter's copies. Without a target the copies are kept and used.

        Checked as :meth:`TargetModel.load` does, before memory is allocated:
        config.json field by field, the safetensors headers, the config's sizes
        against the files, then the whole assembly (names, shapes, dtypes, the
        target it must fit) on meta tensors; then ``sts.json`` (positive finite
        temperatures, one per block position at least). With ``check_finite``,
        NaN or infinite weights are refused. Any problem is a CheckpointError
        naming the file and the field."""
        if embeddings not in ("target", "own"):
            raise ValueError(f"DSparkDrafter.load: embeddings must be 'target' or 'own', got {embeddings!r}")
        folder = Path(folder)
        where = str(folder / "config.json")
        raw = read_config(folder)
        config = DrafterConfig.from_dict(raw, where)
        checkpoint = Checkpoint(folder)
        checkpoint.bound(config.sizes(), {"num_hidden_layers": config.num_hidden_layers,
                                          "len(target_layer_ids)": len(config.target_layer_ids)}, where)
        try:
            rope_inv_freq(config.head_dim, config.rope)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        # the whole assembly on meta tensors: names, shapes, dtypes, the target
        cls._assemble(folder, DrafterConfig.from_dict(raw, where), checkpoint.meta_tensors(), target, embeddings,
                      meta=True)
        sts = None
        sts_path = folder / "sts.json"
        if os.path.lexists(sts_path):
            sts = STS.load(sts_path)
            if sts.gamma < config.block_size:
                raise CheckpointError(f"{sts_path}: field 'temperatures' has {sts.gamma} entries, the drafter's "
                                      f"block_size is {config.block_size}")
        drafter = cls._assemble(folder, config, checkpoint.load(check_finite=check_finite), target, embeddings)
        drafter.sts = sts
        return drafter.to(device=device, dtype=dtype).eval()

    @classmethod
    def _assemble(cls, folder: Path, config: DrafterConfig, tensors: Dict[str, torch.Tensor],
                  target: Optional[TargetModel], embeddings: str, meta: bool = False) -> "DSparkDrafter":
        """The drafter from its checkpoint's tensors. With ``meta`` (meta tensors)
        it is built on the meta device and only names, shapes and dtypes are
        checked; the checks that read values (the draft vocabulary, the copies of
        the target's weights) wait for the real tensors."""
        copies = {name: tensors.pop(name) for name in COPIES if name in tensors}
        fc = tensors.get("fc.weight")
        if fc is not None and fc.dim() == 2 and fc.shape[1] % len(config.target_layer_ids) == 0:
            config.target_hidden_size = fc.shape[1] // len(config.target_layer_ids)
        if config.form == "gemma4":
            config.intermediate_sizes = _layer_widths(config, tensors)
            for i in range(config.num_hidden_layers):  # a buffer DeepSpec saves; transformers' initial value is 1
                tensors.setdefault(f"layers.{i}.layer_scalar", torch.ones(1, device="meta" if meta else "cpu"))
        if target is not None:
            try:
                check_compatible(config, target)
            except CheckpointError as e:
                raise CheckpointError(f"drafter {folder}: {e}") from None
        if meta:
            with torch.device("meta"):
                drafter = cls(config)
        else:
            drafter = cls(config)
        if "draft_vocab" in tensors and not tensors["draft_vocab"].is_floating_point():
            tensors["draft_vocab"] = tensors["draft_vocab"].to(torch.int32)
        load_state(drafter, tensors, f"drafter {folder}", config.sizes())
        if meta:
            for name, copy in copies.items():
                expected = [config.vocab_size, config.hidden_size]
                if list(copy.shape) != expected or not copy.is_floating_point():
                    raise CheckpointError(f"drafter {folder}: {name} has shape {list(copy.shape)} and dtype "
                                          f"{str(copy.dtype).replace('torch.', '')}, the config implies {expected} "
                                          "(vocab_size, hidden_size) of a float dtype")
            if not copies and embeddings == "own":
                raise CheckpointError(f"drafter {folder}: embeddings='own' but the checkpoint has no "
                                      "embed_tokens.weight or lm_head.weight")
            return drafter
        check_draft_vocab(drafter, f"drafter {folder}")
        try:
            if target is not None and embeddings == "target":
                for name, copy in copies.items():
                    check_copy(name, copy, target)
            elif copies:
                drafter.use_own_embeddings(copies)
        except CheckpointError as e:
            raise CheckpointError(f"drafter {folder}: {e}") from None
        if target is not None:
            drafter.bind(target)
        return drafter

    def use_own_embeddings(self, copies: Dict[str, torch.Tensor]) -> None:
        """Keeps copies of an embedding / LM head (DeepSpec's names) and drafts with them."""
        c = self.config
        for name, value in copies.items():
            if tuple(value.shape) != (c.vocab_size, c.hidden_size):
                raise CheckpointError(f"drafter: {name} has shape {list(value.shape)}, the config implies "
                                      f"{[c.vocab_size, c.hidden_size]}")
            module = nn.Embedding(c.vocab_size, c.hidden_size) if name == "embed_tokens.weight" else \
                Linear(c.hidden_size, c.vocab_size, bias=False)
            with torch.no_grad():
                module.weight.copy_(value)
            setattr(self, name.split(".")[0], module)

    def bind(self, target: TargetModel) -> None:
        """Remembers the target (weakly) for ``save``; checks that it fits."""
        check_compatible(self.config, target)
        object.__setattr__(self, "_target", weakref.ref(target))

    def save(self, folder: PathLike, target: Optional[TargetModel] = None, copies: Optional[bool] = None) -> None:
        """Writes the drafter in DeepSpec's layout, with the copies of the
        embedding and LM head that DeepSpec's loader needs: the drafter's own,
        else those of ``target`` or of the target it was loaded with, cast to the
        drafter's dtype. ``copies``: None (default) writes them when it can and
        warns when it cannot (DeepSpec would initialise them randomly; dspark
        loads such a folder with its target), False never writes them (a smaller
        folder for dspark alone), True requires them."""
        tensors = dict(self.state_dict())
        if target is None and self._target is not None:
            target = self._target()
        dtype = self.fc.weight.dtype
        if copies is False:
            for name in COPIES:
                tensors.pop(name, None)
        elif target is not None:
            if "embed_tokens.weight" not in tensors:
                tensors["embed_tokens.weight"] = target.model.embed_tokens.weight.detach().to(dtype=dtype, copy=True)
            if "lm_head.weight" not in tensors:
                tensors["lm_head.weight"] = target.lm_head.weight.detach().to(dtype=dtype, copy=True)
        elif not all(name in tensors for name in COPIES):
            message = (f"DSparkDrafter.save({str(folder)!r}): without a target there are no copies of the target's "
                       "embedding and LM head to write, which DeepSpec's loader expects (pass target=)")
            if copies:
                raise ValueError(message)
            if not self.config.draft_vocab_size:  # (a draft vocabulary is dspark's alone: DeepSpec cannot read it)
                warnings.warn(message + "; dspark loads the folder with its target", stacklevel=2)
        save_safetensors(tensors, folder, self.config.to_dict())
        if self.sts is not None:
            self.sts.save(Path(folder))

    # ------------------------------------------------------------ running

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def new_cache(self, num_pages: int, page_size: int, max_requests: int, max_pages_per_request: int) -> PagedKVCache:
        p = next(self.parameters())
        c = self.config
        return PagedKVCache(c.num_hidden_layers, num_pages, page_size, c.num_key_value_heads, c.head_dim, p.dtype,
                            p.device, max_requests, max_pages_per_request)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def context_features(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """``[n, m, H_target]`` raw target layer outputs -> ``[n, d]`` context features."""
        return self.hidden_norm(self.fc(target_hidden.reshape(target_hidden.shape[0], -1)))

    @torch.inference_mode()
    def extend_context(self, target_hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       cache: PagedKVCache) -> None:
        """Writes the context keys and values of positions (target hidden states
        ``[n, m, H_target]``) into the drafter's cache; slots < 0 are skipped."""
        if target_hidden.shape[0] == 0:
            return
        x = self.context_features(target_hidden.to(next(self.parameters()).dtype))
        inv_freq = self.inv_freq(x.device)
        for index, layer in enumerate(self.layers):
            k, v = layer.self_attn.context_kv(x)
            ops.rope(k, None, positions, inv_freq=inv_freq)
            ops.append_kv(k, v, cache.k[index], cache.v[index], slots, validate=False)

    @torch.inference_mode()
    def draft(self, target: TargetModel, anchors: torch.Tensor, starts: torch.Tensor, request_slots: torch.Tensor,
              cache: PagedKVCache, num_positions: Optional[int] = None) -> Draft:
        """The parallel backbone over blocks ``[anchor, mask * (block-1)]`` at
        positions ``start .. start + block - 1`` (the anchor's position is
        ``start``; the context is positions ``[0, start)``). The whole block is
        always run (its attention is bidirectional); hidden states and logits are
        returned for its first ``num_positions`` positions (default: all)."""
        c = self.config
        R, gamma = anchors.shape[0], c.block_size
        device = anchors.device
        tokens = torch.full((R, gamma), c.mask_token_id, dtype=torch.int64, device=device)
        tokens[:, 0] = anchors
        offsets = torch.arange(gamma, device=device)
        positions = (starts.unsqueeze(1) + offsets).reshape(-1)
        slots = cache.slots(request_slots.repeat_interleave(gamma), positions)
        block_table = cache.block_table[request_slots.long()]
        kv_lens = (starts + gamma).to(torch.int32)
        cu = torch.arange(0, R * gamma + 1, gamma, dtype=torch.int32, device=device)
        x = self.embed(target, tokens.reshape(-1)).to(next(self.parameters()).dtype)
        inv_freq = self.inv_freq(device)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            a = layer.input_layernorm(x)
            n = a.shape[0]
            q, k, v = attn.block_qkv(a)
            # the block's keys and values are written for this round only (the next round overwrites them)
            out = _layer_attention(q, k, v, cache.k[index], cache.v[index], positions, slots, block_table, kv_lens, cu,
                                   inv_freq, "block", attn.scale)
            x = layer.after_attention(x, attn.o_proj(out.view(n, attn.heads * attn.head_dim)))
        keep = gamma if num_positions is None else num_positions
        if not 1 <= keep <= gamma:
            raise ValueError(f"draft: num_positions must be in [1, {gamma}], got {keep}")
        x = x.view(R, gamma, -1)[:, :keep]
        h = self.norm(x)
        return Draft(h.contiguous(), self.logits(target, h).contiguous())

    def embed(self, target: TargetModel, tokens: torch.Tensor) -> torch.Tensor:
        """The block's input embedding: the target's (as the target embeds:
        Gemma 4 scales it), or the drafter's own copy (scaled the same way in the
        Gemma 4 form)."""
        own = getattr(self, "embed_tokens", None)
        if own is None:
            return target.embed(tokens)
        x = own(tokens)
        if self.config.form == "gemma4":
            x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=torch.float32).to(x.dtype).item()
        return x

    def logits(self, target: TargetModel, h: torch.Tensor) -> torch.Tensor:
        """Base logits ``U`` of the backbone's states over the draft columns: the
        target's LM head as the target applies it (Gemma 4: soft-capped), or the
        drafter's own copy with its config's soft-capping."""
        own = getattr(self, "lm_head", None)
        if own is None:
            cap = target.config.final_logit_softcapping
            if not self.config.draft_vocab_size:
                logits = target.lm_head(h.to(target.lm_head.weight.dtype))
            else:
                rows = self.lm_head_rows(target)
                logits = linear(h.to(rows.dtype), rows, None, self._lm_rows.get("packed"))
        else:
            cap = self.config.final_logit_softcapping
            if not self.config.draft_vocab_size:
                logits = own(h.to(own.weight.dtype))
            else:
                rows = own.weight[self.draft_vocab.long()]
                logits = linear(h.to(rows.dtype), rows)
        return softcap(logits.float(), cap).to(logits.dtype) if cap else logits

    def lm_head_rows(self, target: TargetModel) -> torch.Tensor:
        """The target's LM head rows the drafter scores: all of them, or those of
        the draft vocabulary (gathered once per target weight, device and dtype,
        and packed for CPU inference after :meth:`pack_cpu`)."""
        weight = target.lm_head.weight
        if not self.config.draft_vocab_size:
            return weight
        key = (weight.data_ptr(), weight.device, weight.dtype, tensor_version(weight))
        if self._lm_rows.get("key") != key:
            with torch.inference_mode(False):  # drafting runs in inference mode; the cached rows outlive it
                rows = weight.detach()[self.draft_vocab.long()].contiguous()
            packed = cpu_weight(rows) if self._pack_rows else None
            self._lm_rows = {"key": key, "rows": rows, "packed": packed}
        return self._lm_rows["rows"]

    def __getstate__(self) -> dict:
        # the LM head rows (and their packed copy, which cannot be copied) are
        # gathered again on first use
        state = dict(super().__getstate__())
        state["_lm_rows"] = {}
        return state

    def pack_cpu(self) -> int:
        """Packs the drafter's linear layers (and its LM head rows) for CPU
        inference where :func:`common.cpu_weight` lays them out; returns how many
        layers were packed."""
        self._pack_rows = True
        self._lm_rows = {}
        return pack_cpu_linears(self)

    def vocab_map(self, device: torch.device) -> Optional[torch.Tensor]:
        """The ``[V_d]`` int32 draft vocabulary on ``device`` (None: the whole vocabulary)."""
        if not self.config.draft_vocab_size:
            return None
        return self.draft_vocab if self.draft_vocab.device == torch.device(device) else self.draft_vocab.to(device)

    def markov_weights(self, device: torch.device):
        """(w1, w2) for markov_sample; a rank-0 (DFlash-style) drafter gets zero
        weights, so its corrected logits are its base logits."""
        if self.config.markov_rank > 0:
            return self.markov_head.markov_w1.weight, self.markov_head.markov_w2.weight
        if device not in self._zero_markov:
            dtype = next(self.parameters()).dtype
            w1 = torch.zeros(self.config.vocab_size, 16, dtype=dtype, device=device)
            w2 = torch.zeros(self.config.draft_columns, 16, dtype=dtype, device=device)
            self._zero_markov[device] = (w1, w2)
        return self._zero_markov[device]

    def markov_kwargs(self, hidden: torch.Tensor) -> dict:
        c = self.config
        if c.markov_rank == 0 or c.markov_head_type == "vanilla":
            return {"head": "vanilla"}
        head = self.markov_head
        if c.markov_head_type == "gated":
            return {"head": "gated", "gate_weight": head.gate_proj.weight, "gate_bias": head.gate_proj.bias,
                    "hidden": hidden}
        return {"head": "rnn", "joint_weight": head.joint_proj.weight, "joint_bias": head.joint_proj.bias,
                "hidden": hidden}

    def _sts_tensor(self, device: torch.device) -> torch.Tensor:
        """The STS temperatures on ``device``, copied once per (STS, device)."""
        key = (id(self.sts), str(device))
        if getattr(self, "_sts_cache", (None, None))[0] != key:
            self._sts_cache = (key, self.sts.tensor(device))
        return self._sts_cache[1]

    @torch.inference_mode()
    def confidence(self, hidden: torch.Tensor, anchors: torch.Tensor, drafts: torch.Tensor) -> Optional[ops.ConfidenceOutput]:
        """Conditional confidences (STS-calibrated when the drafter has STS
        temperatures), or None without a confidence head."""
        if not self.config.enable_confidence_head:
            return None
        proj = self.confidence_head.proj
        temperatures = self._sts_tensor(hidden.device)[: hidden.shape[1]] if self.sts is not None else None
        if self.config.confidence_head_with_markov and self.config.markov_rank > 0:
            return ops.confidence(hidden, self.markov_head.markov_w1.weight, anchors, drafts, proj.weight, proj.bias,
                                  temperatures=temperatures, validate=False)
        logits = (hidden.float() @ proj.weight.float().reshape(-1)) + proj.bias.float()
        scaled = logits / temperatures if temperatures is not None else logits
        conf = torch.sigmoid(scaled)
        return ops.ConfidenceOutput(logits, conf, torch.cumprod(conf, dim=1))


def check_compatible(config: DrafterConfig, target: TargetModel) -> None:
    t = target.config
    if config.vocab_size != t.vocab_size:
        raise CheckpointError(f"drafter vocabulary {config.vocab_size} != target vocabulary {t.vocab_size}")
    if config.hidden_size != t.hidden_size:
        raise CheckpointError(f"drafter hidden size {config.hidden_size} != target hidden size {t.hidden_size} "
                              "(the drafter uses the target's embedding and LM head)")
    if config.target_hidden_size != t.hidden_size:
        raise CheckpointError(f"drafter fc expects target hidden size {config.target_hidden_size}, "
                              f"the target has {t.hidden_size}")
    # -1 is the embedding output (DeepSpec's convention)
    bad = [i for i in config.target_layer_ids if not -1 <= i < t.num_hidden_layers]
    if bad:
        raise CheckpointError(f"target_layer_ids {bad} are not layers of the target ({t.num_hidden_layers}; -1 is "
                              "the embedding output)")
    if config.num_target_layers is not None and config.num_target_layers != t.num_hidden_layers:
        raise CheckpointError(f"the drafter was trained on a target of {config.num_target_layers} layers "
                              f"(num_target_layers), this target has {t.num_hidden_layers}")
    if not 0 <= config.mask_token_id < t.vocab_size:
        raise CheckpointError(f"mask_token_id {config.mask_token_id} is outside the vocabulary")


def check_draft_vocab(drafter: "DSparkDrafter", what: str) -> None:
    """The draft vocabulary holds distinct target ids."""
    if not drafter.config.draft_vocab_size:
        return
    ids = drafter.draft_vocab
    V = drafter.config.vocab_size
    if bool(((ids < 0) | (ids >= V)).any()):
        raise CheckpointError(f"{what}: draft_vocab holds ids outside the vocabulary [0, {V})")
    if int(torch.unique(ids).numel()) != ids.numel():
        raise CheckpointError(f"{what}: draft_vocab holds an id twice")


def check_copy(name: str, copy: torch.Tensor, target: TargetModel) -> None:
    """A checkpoint's copy of the target's embedding or LM head must equal the
    target's weight in the checkpoint's dtype, to within one unit in the last
    place of that dtype (so a target loaded in another precision still matches);
    compared in row chunks on the target's device."""
    weight = target.model.embed_tokens.weight if name == "embed_tokens.weight" else target.lm_head.weight
    what = "embedding" if name == "embed_tokens.weight" else "LM head"
    if tuple(copy.shape) != tuple(weight.shape):
        raise CheckpointError(f"drafter {name} has shape {list(copy.shape)}, the target's {what} "
                              f"{list(weight.shape)}")
    ulp = torch.finfo(copy.dtype).eps if copy.dtype.is_floating_point else 0.0
    worst, count = 0.0, 0
    rows = max(1, (1 << 24) // max(1, copy.shape[-1]))
    with torch.no_grad():
        for start in range(0, copy.shape[0], rows):
            theirs = copy[start:start + rows].to(weight.device).float()
            ours = weight[start:start + rows].detach().to(copy.dtype).float()
            diff = (ours - theirs).abs()
            bad = diff > ulp * theirs.abs()
            if bool(bad.any()):
                worst = max(worst, float(diff.max()))
                count += int(bad.sum())
    if count:
        raise CheckpointError(
            f"drafter {name} differs from the target's {what}: {count} of {copy.numel()} entries, largest absolute "
            f"difference {worst:.6g} (compared in the checkpoint's {str(copy.dtype).replace('torch.', '')}). The "
            "drafter was trained with another target; load it with its own target, or pass embeddings='own' to "
            "draft with the drafter's copies (verification still uses this target, so decoding stays exact)")


def _layer_widths(config: DrafterConfig, tensors: Dict[str, torch.Tensor]) -> Optional[List[int]]:
    """Per-layer MLP widths of a Gemma 4 drafter, read from its weights (double
    width in the layers its target config marks as KV-sharing): the base width or
    twice it."""
    widths = []
    for i in range(config.num_hidden_layers):
        w = tensors.get(f"layers.{i}.mlp.gate_proj.weight")
        width = int(w.shape[0]) if w is not None else config.intermediate_size
        widths.append(width if width in (config.intermediate_size, 2 * config.intermediate_size)
                      else config.intermediate_size)
    return widths if any(w != config.intermediate_size for w in widths) else None
