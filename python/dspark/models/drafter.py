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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from .. import ops
from ..calibration import STS
from .common import (CheckpointError, Linear, PackedWeight, PagedKVCache, PathLike, RMSNorm, linear, load_safetensors,
                     load_state, pack_cpu_linears, read_config, rope_inv_freq, rope_parameters, save_safetensors)
from .target import MLP, TargetModel

HEADS = ("vanilla", "gated", "rnn")


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

    @classmethod
    def from_dict(cls, c: dict) -> "DrafterConfig":
        nested = dict(c.get("dspark_config") or c.get("dflash_config") or {})
        get = lambda key, default=None: c.get(key, nested.get(key, default))  # noqa: E731

        def need(key: str):
            value = get(key)
            if value is None:
                raise KeyError(key)
            return value

        try:
            heads = int(c["num_attention_heads"])
            layer_ids = need("target_layer_ids")
            cfg = cls(
                hidden_size=int(c["hidden_size"]),
                intermediate_size=int(c["intermediate_size"]),
                num_hidden_layers=int(c["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(c.get("num_key_value_heads") or heads),
                head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                vocab_size=int(c["vocab_size"]),
                block_size=int(need("block_size")),
                target_layer_ids=[int(x) for x in layer_ids],
                target_hidden_size=int(get("target_hidden_size", c["hidden_size"])),
                mask_token_id=int(need("mask_token_id")),
                markov_rank=int(get("markov_rank", 0) or 0),
                draft_vocab_size=int(get("draft_vocab_size", 0) or 0),
                markov_head_type=str(get("markov_head_type", "vanilla") or "vanilla"),
                enable_confidence_head=bool(get("enable_confidence_head", False)),
                confidence_head_with_markov=bool(get("confidence_head_with_markov", True)),
                rope=rope_parameters(c),
                raw=dict(c),
            )
        except (KeyError, TypeError) as missing:
            raise CheckpointError(f"drafter config.json lacks {missing}") from None
        if cfg.markov_head_type not in HEADS:
            raise CheckpointError(f"markov_head_type must be one of {HEADS}, got {cfg.markov_head_type!r}")
        if cfg.block_size < 1:
            raise CheckpointError(f"block_size must be >= 1, got {cfg.block_size}")
        if not 0 <= cfg.draft_vocab_size <= cfg.vocab_size:
            raise CheckpointError(f"draft_vocab_size must be in [0, vocab_size = {cfg.vocab_size}], "
                                  f"got {cfg.draft_vocab_size}")
        return cfg

    @property
    def draft_columns(self) -> int:
        """Columns of the drafter's logits: the draft vocabulary, or the vocabulary."""
        return self.draft_vocab_size or self.vocab_size

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.raw.items() if k not in ("dspark_config", "dflash_config")}
        out.update(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            vocab_size=self.vocab_size, block_size=self.block_size, target_layer_ids=list(self.target_layer_ids),
            target_hidden_size=self.target_hidden_size, mask_token_id=self.mask_token_id,
            markov_rank=self.markov_rank, markov_head_type=self.markov_head_type,
            draft_vocab_size=self.draft_vocab_size,
            enable_confidence_head=self.enable_confidence_head,
            confidence_head_with_markov=self.confidence_head_with_markov,
            rope_parameters=dict(self.rope),
        )
        out.setdefault("model_type", "dspark")
        if not self.draft_vocab_size:
            out.pop("draft_vocab_size", None)  # the DeepSpec layout has no draft vocabulary
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
        return out


class DrafterAttention(nn.Module):
    def __init__(self, c: DrafterConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.heads * self.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)

    def context_kv(self, x: torch.Tensor):
        """Keys (normed, not rotated) and values of context features x [n, d]."""
        n = x.shape[0]
        k = self.k_norm(self.k_proj(x).view(n, self.kv_heads, self.head_dim))
        return k.contiguous(), self.v_proj(x).view(n, self.kv_heads, self.head_dim).contiguous()


class DrafterLayer(nn.Module):
    def __init__(self, c: DrafterConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DrafterAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)


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
        self.fc = Linear(len(c.target_layer_ids) * c.target_hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList([DrafterLayer(c) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
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

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, folder: PathLike, target: Optional[TargetModel] = None, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> "DSparkDrafter":
        config = DrafterConfig.from_dict(read_config(folder))
        tensors = load_safetensors(folder)
        fc = tensors.get("fc.weight")
        if fc is not None and fc.shape[1] % len(config.target_layer_ids) == 0:
            config.target_hidden_size = fc.shape[1] // len(config.target_layer_ids)
        if target is not None:
            check_compatible(config, target)
        drafter = cls(config)
        if "draft_vocab" in tensors:
            tensors["draft_vocab"] = tensors["draft_vocab"].to(torch.int32)
        load_state(drafter, tensors, f"drafter {folder}")
        check_draft_vocab(drafter, f"drafter {folder}")
        sts_path = Path(folder) / "sts.json"
        if sts_path.is_file():
            drafter.sts = STS.load(sts_path)
        return drafter.to(device=device, dtype=dtype).eval()

    def save(self, folder: PathLike) -> None:
        save_safetensors(dict(self.state_dict()), folder, self.config.to_dict())
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
        x = target.embed(tokens.reshape(-1)).to(next(self.parameters()).dtype)
        inv_freq = self.inv_freq(device)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            a = layer.input_layernorm(x)
            n = a.shape[0]
            q = attn.q_norm(attn.q_proj(a).view(n, attn.heads, attn.head_dim)).contiguous()
            k = attn.k_norm(attn.k_proj(a).view(n, attn.kv_heads, attn.head_dim)).contiguous()
            v = attn.v_proj(a).view(n, attn.kv_heads, attn.head_dim).contiguous()
            ops.rope(q, k, positions, inv_freq=inv_freq)
            ops.append_kv(k, v, cache.k[index], cache.v[index], slots, validate=False)  # the block's keys, this round only
            out = ops.paged_attention(q, cache.k[index], cache.v[index], block_table, kv_lens, cu, mask="block",
                                      validate=False)
            x = x + attn.o_proj(out.view(n, attn.heads * attn.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        keep = gamma if num_positions is None else num_positions
        if not 1 <= keep <= gamma:
            raise ValueError(f"draft: num_positions must be in [1, {gamma}], got {keep}")
        x = x.view(R, gamma, -1)[:, :keep]
        h = self.norm(x)
        if not self.config.draft_vocab_size:
            logits = target.lm_head(h.to(target.lm_head.weight.dtype))
        else:
            rows = self.lm_head_rows(target)
            logits = linear(h.to(rows.dtype), rows, None, self._lm_rows.get("packed"))
        return Draft(h.contiguous(), logits.contiguous())

    def lm_head_rows(self, target: TargetModel) -> torch.Tensor:
        """The target's LM head rows the drafter scores: all of them, or those of
        the draft vocabulary (gathered once per target weight, device and dtype,
        and packed for CPU inference after :meth:`pack_cpu`)."""
        weight = target.lm_head.weight
        if not self.config.draft_vocab_size:
            return weight
        key = (weight.data_ptr(), weight.device, weight.dtype, weight._version)
        if self._lm_rows.get("key") != key:
            rows = weight.detach()[self.draft_vocab.long()].contiguous()
            packed = PackedWeight(rows) if self._pack_rows and PackedWeight.usable(rows) else None
            self._lm_rows = {"key": key, "rows": rows, "packed": packed}
        return self._lm_rows["rows"]

    def pack_cpu(self) -> int:
        """Packs the drafter's bfloat16 linear layers (and its LM head rows) for
        CPU inference (common.PackedWeight); returns how many layers were packed."""
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
    bad = [i for i in config.target_layer_ids if not 0 <= i < t.num_hidden_layers]
    if bad:
        raise CheckpointError(f"target_layer_ids {bad} are not layers of the target ({t.num_hidden_layers})")
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
