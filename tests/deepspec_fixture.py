"""Drafter checkpoints exactly as DeepSpec's trainer writes them, and DeepSpec's
draft computation restated densely (written here from DeepSpec's public code:
deepspec/modeling/dspark/{common,markov_head}.py, qwen3/ and gemma4/
{config,modeling}.py, deepspec/trainer/{base_trainer,ckpt_manager}.py,
deepspec/eval/dspark/{evaluator,draft_ops}.py; nothing of it is copied).

What the trainer writes, as read from that code:
- config.json: the target's config (Gemma 4: its text_config) copied, then
  ``architectures`` = [Qwen3DSparkModel | Gemma4DSparkModel],
  ``num_target_layers`` (the target's depth), ``num_hidden_layers`` (the
  drafter's), ``block_size``, ``tie_word_embeddings`` = false, ``layer_types`` =
  full_attention per drafter layer, ``mask_token_id``, ``target_layer_ids``,
  ``num_anchors``, ``enable_confidence_head`` (confidence loss weight > 0) and,
  only when it is on, ``confidence_head_with_markov``; ``markov_rank`` and,
  only when it is > 0, ``markov_head_type`` as given (any case). Gemma 4 adds
  ``target_model_type``, ``target_text_model_type`` and forces
  ``enable_moe_block`` = false, ``hidden_size_per_layer_input`` = 0.
  ``save_pretrained`` (transformers 5.10.2, DeepSpec's pin) adds ``dtype`` and
  ``transformers_version``; Gemma 4's global layers are described by
  ``global_head_dim`` and ``num_global_key_value_heads`` there.
- model.safetensors: the drafter's whole state dict (FSDP full state dict,
  ``_orig_mod.`` prefixes of torch.compile removed) in the training precision
  (bfloat16): the frozen copies ``embed_tokens.weight`` and ``lm_head.weight``
  of the target's (loaded in bfloat16), ``fc``, ``hidden_norm``, ``layers.{i}.*``,
  ``norm``, ``markov_head.*``, ``confidence_head.proj.*``, and Gemma 4's
  ``layers.{i}.layer_scalar`` buffers; no rotary buffers (not persistent).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dspark.models import TargetModel

DEEPSPEC_TRANSFORMERS = "5.10.2"


def trainer_config(target_config: dict, *, form: str, layers: int, block_size: int, target_layer_ids: Sequence[int],
                   mask_token_id: int, markov_rank: int, markov_head_type: Optional[str], confidence: bool,
                   confidence_head_with_markov: bool = True, num_anchors: int = 512) -> dict:
    """The drafter's config.json as DeepSpec's trainer writes it from the target's."""
    if form == "gemma4":
        c = dict(target_config["text_config"]) if target_config.get("model_type") == "gemma4" else dict(target_config)
        text_type = c.get("model_type", "gemma4_text")
        # DeepSpec's pinned transformers writes the global layers' fields, not a per-layer table
        table = c.pop("per_layer_config", None) or {}
        full = [i for i, t in enumerate(c["layer_types"]) if t == "full_attention"]
        if full and str(full[0]) in table:
            c["global_head_dim"] = table[str(full[0])]["head_dim"]
            if "num_key_value_heads" in table[str(full[0])]:
                c["num_global_key_value_heads"] = table[str(full[0])]["num_key_value_heads"]
        c.update(architectures=["Gemma4DSparkModel"], target_model_type=target_config.get("model_type"),
                 target_text_model_type=text_type, enable_moe_block=False, hidden_size_per_layer_input=0)
    else:
        c = dict(target_config)
        c["architectures"] = ["Qwen3DSparkModel"]
    c.update(num_target_layers=int(c["num_hidden_layers"]), num_hidden_layers=layers, block_size=block_size,
             tie_word_embeddings=False, layer_types=["full_attention"] * layers, mask_token_id=mask_token_id,
             target_layer_ids=list(target_layer_ids), num_anchors=num_anchors, enable_confidence_head=confidence,
             markov_rank=markov_rank)
    if confidence:
        c["confidence_head_with_markov"] = confidence_head_with_markov
    if markov_rank > 0:
        c["markov_head_type"] = markov_head_type
    c.update(dtype="bfloat16", transformers_version=DEEPSPEC_TRANSFORMERS)
    return c


def drafter_tensors(config: dict, target: TargetModel, *, seed: int = 0, scale: float = 0.1,
                    dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """A drafter's state dict under DeepSpec's names (random weights, norms near
    1), with the embedding and LM head copied from the target in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: scale * torch.randn(*shape, generator=g)  # noqa: E731
    ones = lambda n: 1.0 + 0.2 * torch.randn(n, generator=g)  # noqa: E731
    gemma = "Gemma4DSparkModel" in config["architectures"]
    d, V, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    H = config["num_attention_heads"]
    if gemma:
        D = config["global_head_dim"]
        k_eq_v = bool(config.get("attention_k_eq_v", False))
        Hkv = config["num_global_key_value_heads"] if k_eq_v else config["num_key_value_heads"]
    else:
        D, Hkv, k_eq_v = config["head_dim"], config["num_key_value_heads"], False
    bias = bool(config.get("attention_bias", False))
    t: Dict[str, torch.Tensor] = {"embed_tokens.weight": target.model.embed_tokens.weight.detach().clone()}
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        shapes = {"q_proj": (H * D, d), "k_proj": (Hkv * D, d), "v_proj": (Hkv * D, d), "o_proj": (d, H * D)}
        for name, shape in shapes.items():
            if name == "v_proj" and k_eq_v:
                continue
            t[p + f"self_attn.{name}.weight"] = rand(*shape)
            if bias:
                t[p + f"self_attn.{name}.bias"] = rand(shape[0])
        t[p + "self_attn.q_norm.weight"] = ones(D)
        t[p + "self_attn.k_norm.weight"] = ones(D)
        t[p + "mlp.gate_proj.weight"] = rand(inter, d)
        t[p + "mlp.up_proj.weight"] = rand(inter, d)
        t[p + "mlp.down_proj.weight"] = rand(d, inter)
        t[p + "input_layernorm.weight"] = ones(d)
        t[p + "post_attention_layernorm.weight"] = ones(d)
        if gemma:
            t[p + "pre_feedforward_layernorm.weight"] = ones(d)
            t[p + "post_feedforward_layernorm.weight"] = ones(d)
            t[p + "layer_scalar"] = torch.ones(1)
    t["norm.weight"] = ones(d)
    t["fc.weight"] = rand(d, len(config["target_layer_ids"]) * d)
    t["hidden_norm.weight"] = ones(d)
    t["lm_head.weight"] = target.lm_head.weight.detach().clone()
    r = int(config["markov_rank"])
    if r:
        t["markov_head.markov_w1.weight"] = rand(V, r) * 10
        t["markov_head.markov_w2.weight"] = rand(V, r) * 10
        kind = str(config["markov_head_type"]).lower()
        if kind == "gated":
            t["markov_head.gate_proj.weight"] = rand(r, d + r)
            t["markov_head.gate_proj.bias"] = rand(r)
        elif kind == "rnn":
            t["markov_head.joint_proj.weight"] = rand(3 * r, 2 * r + d)
            t["markov_head.joint_proj.bias"] = rand(3 * r)
    if config["enable_confidence_head"]:
        width = d + (r if config.get("confidence_head_with_markov") else 0)
        t["confidence_head.proj.weight"] = rand(1, width)
        t["confidence_head.proj.bias"] = rand(1)
    return {k: v.to(dtype).contiguous() for k, v in t.items()}


def write_checkpoint(folder: Path, target_dir: Path, target: TargetModel, *, form: str = "qwen3", layers: int = 2,
                     block_size: int = 5, target_layer_ids: Sequence[int] = (0, 2), mask_token_id: Optional[int] = None,
                     markov_rank: int = 16, markov_head_type: Optional[str] = "vanilla", confidence: bool = True,
                     confidence_head_with_markov: bool = True, seed: int = 0, scale: float = 0.1
                     ) -> Dict[str, torch.Tensor]:
    """Writes ``folder`` as DeepSpec's trainer would for a drafter of the target
    in ``target_dir`` (``target``: its weights, for the frozen copies); returns
    the tensors written."""
    target_config = json.loads((Path(target_dir) / "config.json").read_text())
    vocab = target.config.vocab_size
    config = trainer_config(target_config, form=form, layers=layers, block_size=block_size,
                            target_layer_ids=target_layer_ids,
                            mask_token_id=vocab - 1 if mask_token_id is None else mask_token_id,
                            markov_rank=markov_rank, markov_head_type=markov_head_type, confidence=confidence,
                            confidence_head_with_markov=confidence_head_with_markov)
    tensors = drafter_tensors(config, target, seed=seed, scale=scale)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return tensors


# ------------------------------------------------ DeepSpec's draft, densely


def _rms(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, gemma: bool) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return x32.to(x.dtype)
    return (x32 * weight.float()).to(x.dtype) if gemma else weight * x32.to(x.dtype)


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [n, heads, D] at positions [n]: x cos + rotate_half(x) sin over the whole head dim."""
    angles = positions.float()[:, None] * inv_freq.float()[None]
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * emb.cos().to(x.dtype) + rotated * emb.sin().to(x.dtype)


def reference_inv_freq(config: dict) -> torch.Tensor:
    """The drafter's rotary frequencies from its config: Qwen3's default rope
    over head_dim; Gemma 4's full-attention rope over global_head_dim
    (proportional: the first partial_rotary_factor of the pairs, the rest 0)."""
    if "Gemma4DSparkModel" in config["architectures"]:
        params, dim = config["rope_parameters"]["full_attention"], config["global_head_dim"]
    else:
        params, dim = config["rope_parameters"], config["head_dim"]
    base = float(params["rope_theta"])
    inv = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    if params.get("rope_type") == "proportional":
        inv[int(float(params.get("partial_rotary_factor", 1.0)) * dim // 2):] = 0.0
    return inv


@torch.no_grad()
def reference_draft(tensors: Dict[str, torch.Tensor], config: dict, features: torch.Tensor, anchor: int,
                    prev_tokens: Sequence[int]) -> dict:
    """One request's draft as DeepSpec's evaluator computes it, in float32:
    context features ``hidden_norm(fc(features))`` of positions [0, start) and
    the block ``[anchor, mask * (block - 1)]`` at positions start.. (start =
    len(features)) go through every layer: queries of the block; keys and values
    of context and block with the same projections (k_norm, Gemma's v_norm),
    rotated at their positions; every block query sees all of them (no mask);
    then the final norm and the LM head (Gemma: soft-capped) give the base
    logits. ``prev_tokens`` (the anchor, then the drafts) feed the Markov head
    (vanilla, gated, rnn) and the confidence head. Returns hidden, base_logits,
    corrected_logits, confidence_logits."""
    t = {k: v.float() for k, v in tensors.items()}
    gemma = "Gemma4DSparkModel" in config["architectures"]
    eps = float(config["rms_norm_eps"])
    d, H = config["hidden_size"], config["num_attention_heads"]
    if gemma:
        D = config["global_head_dim"]
        k_eq_v = bool(config.get("attention_k_eq_v", False))
        Hkv = config["num_global_key_value_heads"] if k_eq_v else config["num_key_value_heads"]
        act = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
    else:
        D, Hkv, k_eq_v = config["head_dim"], config["num_key_value_heads"], False
        act = F.silu
    gamma = int(config["block_size"])
    start = features.shape[0]
    lin = lambda x, name: F.linear(x, t[name + ".weight"], t.get(name + ".bias"))  # noqa: E731
    ctx = _rms(lin(features.float(), "fc"), t["hidden_norm.weight"], eps, gemma)
    ids = torch.tensor([anchor] + [config["mask_token_id"]] * (gamma - 1))
    x = F.embedding(ids, t["embed_tokens.weight"])
    if gemma:
        x = x * math.sqrt(d)
    positions = torch.arange(start + gamma)
    inv_freq = reference_inv_freq(config)
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        a = _rms(x, t[p + "input_layernorm.weight"], eps, gemma)
        q = _rms(lin(a, p + "self_attn.q_proj").view(gamma, H, D), t[p + "self_attn.q_norm.weight"], eps, gemma)
        both = torch.cat([ctx, a])
        k_raw = lin(both, p + "self_attn.k_proj").view(-1, Hkv, D)
        v = k_raw if k_eq_v else lin(both, p + "self_attn.v_proj").view(-1, Hkv, D)
        k = _rms(k_raw, t[p + "self_attn.k_norm.weight"], eps, gemma)
        if gemma:
            v = _rms(v, None, eps, gemma)
        q = _rotate(q, positions[start:], inv_freq)
        k = _rotate(k, positions, inv_freq)
        G = H // Hkv
        scale = 1.0 if gemma else D ** -0.5
        scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(G, dim=1)) * scale
        out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v.repeat_interleave(G, dim=1))
        h = lin(out.reshape(gamma, H * D), p + "self_attn.o_proj")
        if gemma:
            x = x + _rms(h, t[p + "post_attention_layernorm.weight"], eps, gemma)
            m = _rms(x, t[p + "pre_feedforward_layernorm.weight"], eps, gemma)
            m = lin(act(lin(m, p + "mlp.gate_proj")) * lin(m, p + "mlp.up_proj"), p + "mlp.down_proj")
            x = (x + _rms(m, t[p + "post_feedforward_layernorm.weight"], eps, gemma)) * t[p + "layer_scalar"]
        else:
            x = x + h
            m = _rms(x, t[p + "post_attention_layernorm.weight"], eps, gemma)
            x = x + lin(act(lin(m, p + "mlp.gate_proj")) * lin(m, p + "mlp.up_proj"), p + "mlp.down_proj")
    hidden = _rms(x, t["norm.weight"], eps, gemma)
    base = F.linear(hidden, t["lm_head.weight"])
    cap = config.get("final_logit_softcapping") if gemma else None
    if cap:
        base = torch.tanh(base / cap) * cap
    prev = torch.tensor(list(prev_tokens)[:gamma])
    corrected = base.clone()
    r = int(config["markov_rank"])
    e = None
    if r:
        kind = str(config["markov_head_type"]).lower()
        e = F.embedding(prev, t["markov_head.markov_w1.weight"])  # W1[x_{k-1}]
        w2 = t["markov_head.markov_w2.weight"]
        if kind == "vanilla":
            corrected = base + F.linear(e, w2)
        elif kind == "gated":
            gate = torch.sigmoid(lin(torch.cat([hidden, e], -1), "markov_head.gate_proj"))
            corrected = base + F.linear(gate * e, w2)
        else:
            state = torch.zeros(r)
            rows = []
            for k in range(gamma):
                z = lin(torch.cat([state, e[k], hidden[k]]), "markov_head.joint_proj")
                gate, cand, out = z.chunk(3)
                state = torch.sigmoid(gate) * state + (1 - torch.sigmoid(gate)) * torch.tanh(cand)
                rows.append(base[k] + F.linear(torch.tanh(out), w2))
            corrected = torch.stack(rows)
    confidence = None
    if config["enable_confidence_head"]:
        features_c = torch.cat([hidden, e], -1) if config.get("confidence_head_with_markov") and r else hidden
        confidence = lin(features_c, "confidence_head.proj").squeeze(-1)
    return {"hidden": hidden, "base_logits": base, "corrected_logits": corrected, "confidence_logits": confidence}


def greedy_block(reference: dict) -> List[int]:
    """DeepSpec's greedy draft tokens (temperature 0: argmax, first index on ties)."""
    return [int(row.argmax()) for row in reference["corrected_logits"]]
