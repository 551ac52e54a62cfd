"""Training DSpark drafters (DSPARK.md, section 4) for any target the engine loads.

The recipe:
1. **Data.** Prompts from offline corpora (:mod:`dspark.corpus`), continued by
   the target itself (``SpeculativeEngine`` without a drafter; greedy and
   temperature-1 continuations alternate). One target forward over every
   sequence keeps, per position, the raw outputs of the drafter's
   ``target_layer_ids`` (the context features) and the final-norm output (from
   which the frozen LM head gives ``p_t``). The result is cached on disk.
2. **Blocks.** Each step draws sequences, and anchors ``a`` in their generated
   part; a block is ``[x_a, mask * (gamma-1)]`` at positions ``a .. a+gamma-1``
   whose position ``k`` predicts ``x_{a+k}``; it attends to the context
   ``[0, a)`` and to its whole block, exactly as in decoding.
3. **Loss**, position-weighted with ``w_k = exp(-(k-1)/gamma)``:
   ``0.1 * CE(p_d,k, x_{a+k}) + 0.9 * ||p_d,k - p_t,k||_1 + 1.0 * BCE(c_k, c*_k)``
   with ``c*_k = 1 - 0.5 * ||p_d,k - p_t,k||_1`` (detached). ``p_d,k`` is the
   corrected distribution ``softmax(U_k + B_k)`` with the Markov head fed the
   true previous token (teacher forcing). The target, its embedding and its LM
   head stay frozen; with a draft vocabulary, ``p_t`` is scored on its columns
   only, from each position's normaliser over the whole vocabulary computed
   once per run (:class:`Teacher`). ``markov_rank = 0`` without a confidence head is the
   DFlash-style baseline under the same recipe.
4. **Evaluation** of ``tau`` with the engine on held-out prompts, checkpoints
   in the drafter format, and STS fitted on held-out rounds (``sts.json``).

Everything is seeded: the same command gives the same drafter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .calibration import CalibrationRecorder
from .engine import SamplingParams, SpeculativeEngine, json_rates
from .models import Batch, DrafterConfig, DSparkDrafter, TargetModel
from .models.common import softcap
from .models.drafter import HEADS

LOSS_CE, LOSS_L1, LOSS_BCE = 0.1, 0.9, 1.0
INITS = ("random", "target")


@dataclass
class TrainConfig:
    # the drafter
    block_size: int = 7
    markov_rank: int = 64
    markov_head: str = "vanilla"
    draft_vocab: int = 8192  # the N most frequent tokens of the target's generations; 0: the whole vocabulary
    confidence: bool = True
    num_layers: int = 2
    target_layer_ids: Optional[List[int]] = None  # default: three layers spread over the target
    mask_token_id: int = 0
    # "target": draft layer i starts as target layer L - num_layers + i (the top layers) and fc as the
    # identity on the highest context layer; "random": N(0, 0.02) (see new_drafter)
    init: str = "target"
    # optimisation
    steps: int = 10000
    sequences_per_step: int = 8
    blocks_per_sequence: int = 4
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    autocast: bool = True  # bfloat16 autocast where the device multiplies bfloat16 natively (AMX, AVX512-BF16, CUDA)
    # data
    domains: Tuple[str, ...] = ("code", "text")
    train_prompts: int = 5000  # split evenly over the domains
    # chat requests the target writes itself (self_requests), continued by it as "text" prompts besides
    # train_prompts (needs "text" in domains)
    requests: int = 2000
    max_prompt_tokens: int = 256
    max_new_tokens: int = 96
    generation_concurrency: int = 128
    # teacher forcing: answer tokens of offline texts (corpus.offline_texts), split evenly over the domains,
    # and the fraction of training sequences drawn from them (the rest: the target's own continuations)
    offline_tokens: int = 240000
    offline_mix: float = 0.3
    offline_max_tokens: int = 384  # an offline sequence (prompt and answer) is cut there
    data_dtype: str = "auto"  # the target's dtype while making the data (precision.choose; the demo's dtype)
    # evaluation and calibration (held-out prompts)
    eval_every: int = 2500
    eval_prompts: int = 8  # per domain
    eval_new_tokens: int = 48
    eval_temperature: float = 0.0  # greedy: what the demo decodes
    calibration_prompts: int = 24  # per domain
    save_dtype: str = "bfloat16"

    def validate(self) -> None:
        if self.markov_head not in HEADS:
            raise ValueError(f"markov_head must be one of {HEADS}, got {self.markov_head!r}")
        for name in ("block_size", "num_layers", "steps", "sequences_per_step", "blocks_per_sequence",
                     "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.markov_rank < 0:
            raise ValueError(f"markov_rank must be >= 0, got {self.markov_rank}")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0, got {self.draft_vocab}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.offline_tokens < 0 or not 0.0 <= self.offline_mix <= 1.0:
            raise ValueError(f"offline_tokens must be >= 0 and offline_mix in [0, 1], got {self.offline_tokens}, "
                             f"{self.offline_mix}")
        if self.requests < 0:
            raise ValueError(f"requests must be >= 0, got {self.requests}")
        if self.requests and "text" not in self.domains:
            raise ValueError("requests are text prompts: they need 'text' in domains")
        if self.train_prompts < 1 and self.offline_tokens < 1 and self.requests < 1:
            raise ValueError("no training data: train_prompts, requests and offline_tokens are all 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ data


@dataclass
class Sequences:
    """Target-generated sequences and what training reads of the target."""

    tokens: List[torch.Tensor]  # [L] int64 each
    prompt_lens: List[int]
    domains: List[str]
    features: List[torch.Tensor]  # [L, m, H] float16: raw outputs of target_layer_ids
    final: List[torch.Tensor]  # [L - P, H] float32: final-norm outputs at the generated positions
    layer_ids: List[int] = field(default_factory=list)
    # "generated" (the target's continuation of the prompt) or "offline" (an answer the target did not
    # write, teacher-forced); the positions from P on are the ones blocks are anchored in either way
    kinds: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.kinds:
            self.kinds = ["generated"] * len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def save(self, path: Path) -> None:
        torch.save(dataclasses.asdict(self), str(path))

    @classmethod
    def load(cls, path: Path) -> "Sequences":
        return cls(**torch.load(str(path), weights_only=True))

    @classmethod
    def concat(cls, parts: Sequence["Sequences"]) -> "Sequences":
        parts = [p for p in parts if p is not None and len(p)]
        if not parts:
            raise ValueError("Sequences.concat: no data")
        if any(p.layer_ids != parts[0].layer_ids for p in parts):
            raise ValueError("Sequences.concat: the parts hold different target layers")
        out = cls([], [], [], [], [], list(parts[0].layer_ids), [])
        for p in parts:
            for name in ("tokens", "prompt_lens", "domains", "features", "final", "kinds"):
                getattr(out, name).extend(getattr(p, name))
        return out

    def generated_tokens(self, kind: Optional[str] = None) -> int:
        return sum(len(t) - P for t, P, k in zip(self.tokens, self.prompt_lens, self.kinds) if kind in (None, k))


def encode_prompts(tokenizer, prompts, max_tokens: int) -> List[List[int]]:
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template(p.text) if p.chat else tokenizer.encode(p.text)
        out.append(ids[-max_tokens:])
    return out


def generate_sequences(target: TargetModel, prompt_ids: List[List[int]], domains: List[str], stop_tokens: Sequence[int],
                       max_new_tokens: int, concurrency: int, seed: int, progress: bool = True
                       ) -> Tuple[List[List[int]], List[int], List[str]]:
    """The target's own continuations (greedy and temperature 1 alternate)."""
    engine = SpeculativeEngine(target, None, max_concurrency=concurrency,
                               max_model_len=max(len(p) for p in prompt_ids) + max_new_tokens, seed=seed,
                               progress=progress)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, seed=seed * 1000003 + i,
                             max_new_tokens=max_new_tokens, stop_tokens=stop_tokens) for i in range(len(prompt_ids))]
    results = engine.generate(prompt_ids, params)
    tokens, prompt_lens, kept_domains = [], [], []
    for prompt, result, domain in zip(prompt_ids, results, domains):
        if result.error is None and len(result.tokens) >= 4:
            tokens.append(prompt + result.tokens)
            prompt_lens.append(len(prompt))
            kept_domains.append(domain)
    return tokens, prompt_lens, kept_domains


@torch.inference_mode()
def extract(target: TargetModel, sequences: List[List[int]], prompt_lens: List[int], layer_ids: Sequence[int],
            tokens_per_batch: int = 4096, progress: bool = True) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """One target forward over every sequence: context features and final-norm outputs."""
    device = next(target.parameters()).device
    features: List[Optional[torch.Tensor]] = [None] * len(sequences)
    finals: List[Optional[torch.Tensor]] = [None] * len(sequences)
    order = list(range(len(sequences)))
    groups, current, size = [], [], 0
    for i in order:
        if current and size + len(sequences[i]) > tokens_per_batch:
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += len(sequences[i])
    if current:
        groups.append(current)
    bar = _bar(progress, len(groups), "target features")
    page = 16
    for group in groups:
        lens = [len(sequences[i]) for i in group]
        pages_per = (max(lens) + page - 1) // page
        cache = target.new_cache(len(group) * pages_per, page, len(group), pages_per)
        for r, n in enumerate(lens):
            cache.allocate(r, n)
        tokens = torch.tensor([t for i in group for t in sequences[i]], dtype=torch.int64, device=device)
        positions = torch.tensor([p for n in lens for p in range(n)], dtype=torch.int64, device=device)
        requests = torch.tensor([r for r, n in enumerate(lens) for _ in range(n)], dtype=torch.int64, device=device)
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        rows = torch.tensor([cu[r] + p for r, i in enumerate(group) for p in range(prompt_lens[i], lens[r])],
                            dtype=torch.int64, device=device)
        batch = Batch(tokens, positions, torch.tensor(cu, dtype=torch.int32, device=device), cache.block_table,
                      torch.tensor(lens, dtype=torch.int32, device=device), cache.slots(requests, positions))
        out = target(batch, cache, hidden_layers=layer_ids, logits_rows=rows, logits=False, final_hidden=True)
        at = 0
        for r, i in enumerate(group):
            # copies that own their memory: a view would keep (and save) the whole batch's buffer
            features[i] = out.hidden[cu[r]:cu[r + 1]].to("cpu", torch.float16, copy=True)
            n_gen = lens[r] - prompt_lens[i]
            finals[i] = out.final[at:at + n_gen].to("cpu", torch.float32, copy=True)
            at += n_gen
        bar.update(1)
    bar.close()
    return features, finals  # type: ignore[return-value]


def default_layer_ids(num_layers: int) -> List[int]:
    """Three target layers spread from the bottom to near the top."""
    if num_layers <= 3:
        return list(range(num_layers))
    return sorted({1, num_layers // 2, num_layers - 2})


REQUEST_MAX_TOKENS = 64  # a request is kept only when it ends within this many tokens
REQUEST_CHARS = (20, 400)  # and has this many characters (ASCII)
REQUEST_ROUNDS = 4  # rounds of sampling before fewer than asked are returned


def self_requests(target: TargetModel, tokenizer, count: int, split: str, seed: int, stop_tokens: Sequence[int],
                  concurrency: int = 128, progress: bool = True) -> list:
    """Up to ``count`` distinct chat requests written by the target itself, as
    text prompts (corpus.Prompt) of one split.

    The target continues its chat template's prefix of a user turn
    (``tokenizer.chat_user_prefix()``) at temperature 1: a chat model samples
    the kind of request it was tuned to answer, which is the register of
    chat use (questions, advice, stories), not that of the offline corpora.
    A request is kept when it ended (a stop token within REQUEST_MAX_TOKENS),
    has REQUEST_CHARS characters, is ASCII, is new, and falls in ``split`` by
    the hash of its text (corpus.held_out), so training and held-out requests
    never share a text. Sampling runs in rounds until ``count`` are kept."""
    from . import corpus

    prefix = tokenizer.chat_user_prefix()
    engine = SpeculativeEngine(target, None, max_concurrency=concurrency,
                               max_model_len=len(prefix) + REQUEST_MAX_TOKENS, seed=seed, progress=progress)
    stops = set(stop_tokens)
    kept: Dict[str, object] = {}
    drawn = 0
    rate = 1.0 - corpus.HELD_OUT_PERCENT / 100 if split == "train" else corpus.HELD_OUT_PERCENT / 100
    for _ in range(REQUEST_ROUNDS):
        missing = count - len(kept)
        if missing <= 0:
            break
        n = max(16, int(missing / rate * 1.5))  # about a third of the samples are dropped
        params = [SamplingParams(temperature=1.0, seed=seed * 1000003 + drawn + i, max_new_tokens=REQUEST_MAX_TOKENS,
                                 stop_tokens=list(stop_tokens)) for i in range(n)]
        drawn += n
        for result in engine.generate([prefix] * n, params):
            if result.error is not None or not result.tokens or result.tokens[-1] not in stops:
                continue
            text = tokenizer.decode(result.tokens[:-1]).strip()
            source = f"request:{text}"
            if not (REQUEST_CHARS[0] <= len(text) <= REQUEST_CHARS[1]) or not text.isascii() or source in kept:
                continue
            if corpus.held_out(source) == (split == "held-out"):
                kept[source] = corpus.Prompt(text, True, "text", source)
    return list(kept.values())[:count]


def build_data(target: TargetModel, tokenizer, prompts, config: TrainConfig, layer_ids: List[int],
               stop_tokens: Sequence[int], cache_path: Optional[Path] = None, progress: bool = True) -> Sequences:
    if cache_path is not None and cache_path.is_file():
        data = Sequences.load(cache_path)
        if data.layer_ids == list(layer_ids):
            return data
    if callable(prompts):  # made only when the cache cannot serve
        prompts = prompts()
    ids = encode_prompts(tokenizer, prompts, config.max_prompt_tokens)
    tokens, prompt_lens, domains = generate_sequences(target, ids, [p.domain for p in prompts], stop_tokens,
                                                      config.max_new_tokens, config.generation_concurrency,
                                                      config.seed, progress)
    features, finals = extract(target, tokens, prompt_lens, layer_ids, progress=progress)
    data = Sequences([torch.tensor(t, dtype=torch.int64) for t in tokens], prompt_lens, domains, features, finals,
                     list(layer_ids))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        data.save(cache_path)
    return data


def encode_offline(tokenizer, texts, budget: int, max_tokens: int, seed: int, eos: Optional[int] = None
                   ) -> Tuple[List[List[int]], List[int], List[str]]:
    """Offline texts (corpus.OfflineText) as token sequences ``prompt + answer``
    (+ ``eos`` after a chat answer), cut at ``max_tokens``, drawn in a seeded order
    until their answers hold ``budget`` tokens; with the prompt lengths."""
    from . import corpus

    sequences, prompt_lens, domains = [], [], []
    total = 0
    for t in corpus.sample(texts, len(texts), seed):
        if total >= budget:
            break
        prompt = tokenizer.apply_chat_template(t.prompt) if t.chat else tokenizer.encode(t.prompt)
        answer = tokenizer.encode(t.answer) + ([eos] if t.chat and eos is not None else [])
        ids = (prompt + answer)[:max_tokens]
        if len(ids) - len(prompt) < 4:
            continue
        sequences.append(ids)
        prompt_lens.append(len(prompt))
        domains.append(t.domain)
        total += len(ids) - len(prompt)
    return sequences, prompt_lens, domains


def build_offline_data(target: TargetModel, tokenizer, texts_by_domain: Dict[str, list], config: TrainConfig,
                       layer_ids: List[int], eos: Optional[int] = None, cache_path: Optional[Path] = None,
                       progress: bool = True) -> Optional[Sequences]:
    """Teacher forcing on offline texts: one target forward over each, keeping
    the context features and the final-norm outputs of the answer positions
    (no generation). ``config.offline_tokens`` answer tokens, split evenly over
    the domains."""
    if config.offline_tokens <= 0:
        return None
    if cache_path is not None and cache_path.is_file():
        data = Sequences.load(cache_path)
        if data.layer_ids == list(layer_ids):
            return data
    tokens, prompt_lens, domains = [], [], []
    per = config.offline_tokens // max(1, len(texts_by_domain))
    for domain, texts in texts_by_domain.items():
        t, p, d = encode_offline(tokenizer, texts, per, config.offline_max_tokens, config.seed, eos)
        tokens += t
        prompt_lens += p
        domains += d
    features, finals = extract(target, tokens, prompt_lens, layer_ids, progress=progress)
    data = Sequences([torch.tensor(t, dtype=torch.int64) for t in tokens], prompt_lens, domains, features, finals,
                     list(layer_ids), ["offline"] * len(tokens))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        data.save(cache_path)
    return data


# ------------------------------------------------------------- the model


def frequent_tokens(data: Sequences, count: int, vocab: int) -> torch.Tensor:
    """The draft vocabulary: the ``count`` tokens the target generated most often
    (its continuations; ties: smaller id), then the most frequent tokens of the
    offline answers and of the prompts, then the smallest unused ids; as int32
    ids in increasing order. (Without continuations, the offline answers rank
    first.)"""
    generated = torch.zeros(vocab, dtype=torch.int64)
    other = torch.zeros(vocab, dtype=torch.int64)
    own = any(k == "generated" for k in data.kinds)
    for tokens, P, kind in zip(data.tokens, data.prompt_lens, data.kinds):
        if kind == "generated" or not own:
            generated += torch.bincount(tokens[P:], minlength=vocab)
        else:
            other += torch.bincount(tokens[P:], minlength=vocab)
        other += torch.bincount(tokens[:P], minlength=vocab)
    ids = torch.arange(vocab)
    # lexicographic: generated count, then the other counts, then id
    order = sorted(range(vocab), key=lambda v: (-int(generated[v]), -int(other[v]), v))
    chosen = ids[torch.tensor(order[:min(count, vocab)])]
    return torch.sort(chosen).values.to(torch.int32)


def new_drafter(target: TargetModel, config: TrainConfig, seed: int,
                draft_vocab: Optional[torch.Tensor] = None) -> DSparkDrafter:
    t = target.config
    layer_ids = config.target_layer_ids or default_layer_ids(t.num_hidden_layers)
    dconfig = DrafterConfig.from_dict(dict(
        architectures=["DSparkDraftModel"], model_type="dspark", hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, vocab_size=t.vocab_size,
        rope_parameters=dict(t.rope), block_size=config.block_size, target_layer_ids=layer_ids,
        target_hidden_size=t.hidden_size, mask_token_id=config.mask_token_id, markov_rank=config.markov_rank,
        markov_head_type=config.markov_head, enable_confidence_head=config.confidence,
        confidence_head_with_markov=config.markov_rank > 0,
        draft_vocab_size=int(draft_vocab.numel()) if draft_vocab is not None else 0))
    torch.manual_seed(seed)
    drafter = DSparkDrafter(dconfig)
    if draft_vocab is not None:
        drafter.draft_vocab.copy_(draft_vocab)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("markov_w2.weight") or name.startswith("confidence_head"):
                p.zero_()  # the Markov bias starts at 0; confidences at 0.5
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        if config.init == "target":
            init_from_target(drafter, target)
    return drafter


def init_from_target(drafter: DSparkDrafter, target: TargetModel) -> List[int]:
    """Draft layer ``i`` of ``n`` starts as target layer ``L - n + i`` (the target's top
    layers: attention projections, MLP and both norms; per-head q/k norms where
    the target has them, else 1), and ``fc`` as the identity on the highest
    context layer's features (0 on the others), so the context the draft
    layers first see is the target's own residual stream there. Returns the
    target layers copied."""
    t, c = target.config, drafter.config
    if t.gemma4 is not None or c.form != "qwen3":
        raise ValueError("init='target' supports Llama / Qwen3 targets")
    if (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim) != (
            c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim):
        raise ValueError("init='target': the draft layers do not have the target layers' shape")
    layers = list(range(t.num_hidden_layers - c.num_hidden_layers, t.num_hidden_layers))
    with torch.no_grad():
        for mine, index in zip(drafter.layers, layers):
            theirs = target.model.layers[index]
            for name, value in theirs.state_dict().items():
                if name in mine.state_dict():
                    mine.state_dict()[name].copy_(value)
        top = max(range(len(c.target_layer_ids)), key=lambda i: c.target_layer_ids[i])
        H = c.target_hidden_size
        drafter.fc.weight.zero_()
        drafter.fc.weight[:, top * H:(top + 1) * H].copy_(torch.eye(c.hidden_size, H))
    return layers


def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding (as ops.rope) of x [..., n, heads, D] at positions [..., n]."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., n, D/2]
    cos, sin = angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class Blocks:
    """One step's training blocks: S sequences x n blocks of gamma positions."""

    context: torch.Tensor  # [S, Lmax, m * H] target features (float32)
    context_len: torch.Tensor  # [S] valid context positions
    anchors: torch.Tensor  # [S, n] anchor positions a
    inputs: torch.Tensor  # [S, n, gamma] block tokens [x_a, mask...]
    prev: torch.Tensor  # [S, n, gamma] x_{a+k-1} (the Markov head's previous token)
    labels: torch.Tensor  # [S, n, gamma] x_{a+k} (-1 past the end)
    final: torch.Tensor  # [S, n, gamma, H] target final-norm outputs predicting x_{a+k}
    # [S, n, gamma] log of p_t's normaliser over the whole vocabulary at each position (Teacher), or None
    lse: Optional[torch.Tensor] = None


def draw_blocks(data: Sequences, indices: Sequence[int], config: TrainConfig, rng: random.Random,
                mask_token: int, device: torch.device = torch.device("cpu"),
                lse: Optional[List[Optional[torch.Tensor]]] = None) -> Blocks:
    gamma, n = config.block_size, config.blocks_per_sequence
    S = len(indices)
    Lmax = max(len(data.tokens[i]) for i in indices)
    m_h = data.features[indices[0]].shape[1] * data.features[indices[0]].shape[2]
    H = data.final[indices[0]].shape[1]
    context = torch.zeros(S, Lmax, m_h)
    context_len = torch.zeros(S, dtype=torch.int64)
    anchors = torch.zeros(S, n, dtype=torch.int64)
    inputs = torch.full((S, n, gamma), mask_token, dtype=torch.int64)
    prev = torch.zeros(S, n, gamma, dtype=torch.int64)
    labels = torch.full((S, n, gamma), -1, dtype=torch.int64)
    final = torch.zeros(S, n, gamma, H)
    norm = torch.zeros(S, n, gamma) if lse is not None else None
    for s, i in enumerate(indices):
        tokens, P = data.tokens[i], data.prompt_lens[i]
        L = len(tokens)
        context[s, :L] = data.features[i].reshape(L, -1).float()
        context_len[s] = L
        for b in range(n):
            a = rng.randrange(P, L - 1)  # the anchor is a generated token with at least one after it
            anchors[s, b] = a
            inputs[s, b, 0] = tokens[a]
            for k in range(1, gamma + 1):
                if a + k >= L:
                    break
                prev[s, b, k - 1] = tokens[a + k - 1]
                labels[s, b, k - 1] = tokens[a + k]
                final[s, b, k - 1] = data.final[i][a + k - 1 - P].float()
                if norm is not None:
                    norm[s, b, k - 1] = lse[i][a + k - 1 - P]
    return Blocks(*(t.to(device) if t is not None else None
                    for t in (context, context_len, anchors, inputs, prev, labels, final, norm)))


@dataclass
class Teacher:
    """The frozen LM head as the loss reads it, prepared once per run rather than
    per step: ``weight`` in the dtype the products run in (autocast's; casting
    the whole head every step was a sixth of a step on the CPU), ``rows`` the
    draft vocabulary's rows (``weight`` itself without one), ``cap`` the
    target's logit soft-cap. With a draft vocabulary, :meth:`log_normalisers`
    gives every training position's ``log sum exp`` over the whole vocabulary
    once, so a step scores ``p_t`` on the ``V_d`` columns only
    (``exp(logit - lse)``, the same distribution as the softmax over all ``V``
    then restricted; about 6x fewer multiply-adds for SmolLM2 at ``V_d`` 8192)."""

    weight: torch.Tensor  # [V, H]
    rows: torch.Tensor  # [V_d, H] (or [V, H])
    cap: Optional[float]

    @classmethod
    def of(cls, drafter: DSparkDrafter, target: TargetModel, dtype: torch.dtype = torch.float32) -> "Teacher":
        with torch.no_grad():
            weight = target.lm_head.weight.detach().to(dtype)
            rows = drafter.lm_head_rows(target).detach().to(dtype) if drafter.config.draft_vocab_size else weight
        return cls(weight, rows, target.config.final_logit_softcapping)

    def logits(self, x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        """The target's (soft-capped) logits, float32, over ``rows`` or the whole vocabulary."""
        w = self.rows if rows else self.weight
        return softcap(F.linear(x.to(w.dtype), w).float(), self.cap)

    def log_normalisers(self, data: Sequences, indices: Sequence[int], chunk: int = 128,
                        progress: bool = False) -> List[Optional[torch.Tensor]]:
        """``[L - P]`` float32 per sequence in ``indices`` (None for the others),
        computed over ``chunk`` positions at a time across sequences."""
        out: List[Optional[torch.Tensor]] = [None] * len(data)
        sizes = [data.final[i].shape[0] for i in indices]
        bar = _bar(progress, sum(sizes), "p_t normalisers")
        parts: List[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(indices), 64):  # a few sequences at a time: bounded memory
                group = indices[start:start + 64]
                final = torch.cat([data.final[i] for i in group]).to(self.weight.device)
                lse = torch.cat([torch.logsumexp(self.logits(final[j:j + chunk]), dim=-1)
                                 for j in range(0, final.shape[0], chunk)]).cpu()
                parts.extend(lse.split(sizes[start:start + 64]))
                bar.update(final.shape[0])
        bar.close()
        for i, part in zip(indices, parts):
            out[i] = part
        return out


def backbone(drafter: DSparkDrafter, target: TargetModel, blocks: Blocks) -> torch.Tensor:
    """The parallel backbone with autograd: hidden states ``[S, n, gamma, d]`` (after
    the final norm), with the attention of decoding: context ``[0, a)`` and the
    whole block."""
    c = drafter.config
    S, n, gamma = blocks.inputs.shape
    Lmax = blocks.context.shape[1]
    ctx = drafter.hidden_norm(drafter.fc(blocks.context))  # [S, Lmax, d]
    x = target.embed(blocks.inputs.reshape(S, n * gamma)).detach()  # frozen embedding
    inv_freq = drafter.inv_freq(x.device)
    device = x.device
    ctx_pos = torch.arange(Lmax, device=device).expand(S, Lmax)
    blk_pos = (blocks.anchors.unsqueeze(-1) + torch.arange(gamma, device=device)).reshape(S, n * gamma)
    # mask [S, n*gamma, Lmax + n*gamma]
    key_ctx = ctx_pos.unsqueeze(1) < blocks.anchors.repeat_interleave(gamma, dim=1).unsqueeze(-1)
    block_id = torch.arange(n, device=device).repeat_interleave(gamma)
    key_blk = (block_id.unsqueeze(0) == block_id.unsqueeze(1)).expand(S, -1, -1)
    mask = torch.cat([key_ctx, key_blk], dim=-1).unsqueeze(1)
    H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    for layer in drafter.layers:
        attn = layer.self_attn
        k_ctx = _rope(attn.k_norm(attn.k_proj(ctx).view(S, Lmax, Hkv, D)), ctx_pos, inv_freq)
        v_ctx = attn.v_proj(ctx).view(S, Lmax, Hkv, D)
        a = layer.input_layernorm(x)
        q = _rope(attn.q_norm(attn.q_proj(a).view(S, n * gamma, H, D)), blk_pos, inv_freq)
        k_blk = _rope(attn.k_norm(attn.k_proj(a).view(S, n * gamma, Hkv, D)), blk_pos, inv_freq)
        v_blk = attn.v_proj(a).view(S, n * gamma, Hkv, D)
        k = torch.cat([k_ctx, k_blk], dim=1).repeat_interleave(H // Hkv, dim=2)
        v = torch.cat([v_ctx, v_blk], dim=1).repeat_interleave(H // Hkv, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(S, n * gamma, H * D))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return drafter.norm(x).view(S, n, gamma, -1)


def markov_bias(drafter: DSparkDrafter, hidden: torch.Tensor, prev: torch.Tensor) -> Optional[torch.Tensor]:
    """``B_k`` for every block position (teacher forcing: the true previous tokens),
    as ops.markov_sample computes it; None for rank 0."""
    c = drafter.config
    if c.markov_rank == 0:
        return None
    head = drafter.markov_head
    e = head.markov_w1(prev)  # [S, n, gamma, r]
    if c.markov_head_type == "vanilla":
        a = e
    elif c.markov_head_type == "gated":
        a = torch.sigmoid(head.gate_proj(torch.cat([hidden, e], dim=-1))) * e
    else:
        r = c.markov_rank
        state = torch.zeros_like(e[..., 0, :])
        outs = []
        for k in range(e.shape[-2]):
            y = head.joint_proj(torch.cat([state, e[..., k, :], hidden[..., k, :]], dim=-1))
            gate, cand, out = y[..., :r], y[..., r:2 * r], y[..., 2 * r:]
            state = torch.sigmoid(gate) * state + (1 - torch.sigmoid(gate)) * torch.tanh(cand)
            outs.append(torch.tanh(out))
        a = torch.stack(outs, dim=-2)
    return head.markov_w2(a)


def position_weights(gamma: int) -> torch.Tensor:
    return torch.exp(-torch.arange(gamma, dtype=torch.float32) / gamma)


def loss_terms(drafter: DSparkDrafter, target: TargetModel, blocks: Blocks,
               teacher: Optional[Teacher] = None) -> Dict[str, torch.Tensor]:
    """The three loss terms (position-weighted means) and acceptance statistics.
    ``teacher`` defaults to the float32 head (pass one made once per run)."""
    teacher = teacher or Teacher.of(drafter, target)
    hidden = backbone(drafter, target, blocks)
    # the LM head as the target applies it (soft-capped for Gemma 4); U_k, [S, n, gamma, V_d]
    logits = softcap(F.linear(hidden, teacher.rows), teacher.cap)
    bias = markov_bias(drafter, hidden, blocks.prev)
    corrected = logits + bias if bias is not None else logits
    valid = blocks.labels >= 0
    w = position_weights(blocks.inputs.shape[-1]).to(valid.device).expand_as(blocks.labels) * valid
    total = w.sum().clamp(min=1e-6)
    log_pd = torch.log_softmax(corrected, dim=-1)
    sub = bool(drafter.config.draft_vocab_size)
    with torch.no_grad():
        if sub and blocks.lse is not None:  # on the V_d columns, normalised over the whole vocabulary
            p_t = torch.exp(teacher.logits(blocks.final, rows=True) - blocks.lse.unsqueeze(-1))
        else:
            p_t = torch.softmax(teacher.logits(blocks.final), dim=-1)  # over the whole vocabulary
            if sub:
                p_t = p_t[..., drafter.draft_vocab.long()]
    labels = blocks.labels.clamp(min=0)
    outside = None
    w_ce = w
    if sub:
        # p_d is 0 outside the draft vocabulary: p_t's mass there is all L1 distance, and a
        # label outside it has no column (no cross-entropy term)
        ids = drafter.draft_vocab.long()
        column = torch.full((drafter.config.vocab_size,), -1, dtype=torch.int64, device=ids.device)
        column[ids] = torch.arange(ids.numel(), device=ids.device)
        outside = (1.0 - p_t.sum(-1)).clamp(min=0.0)
        labels = column[labels]
        w_ce = w * (labels >= 0)
        labels = labels.clamp(min=0)
    ce = F.nll_loss(log_pd.reshape(-1, log_pd.shape[-1]), labels.reshape(-1), reduction="none").view_as(w)
    l1 = (log_pd.exp() - p_t).abs().sum(-1)
    if outside is not None:
        l1 = l1 + outside
    terms = {"ce": (ce * w_ce).sum() / w_ce.sum().clamp(min=1e-6), "l1": (l1 * w).sum() / total}
    accept = (1 - 0.5 * l1).detach()
    if drafter.config.enable_confidence_head:
        proj = drafter.confidence_head.proj
        x = hidden
        if drafter.config.confidence_head_with_markov and drafter.config.markov_rank > 0:
            x = torch.cat([x, drafter.markov_head.markov_w1(blocks.prev)], dim=-1)
        conf_logit = proj(x).squeeze(-1)
        bce = F.binary_cross_entropy_with_logits(conf_logit, accept.clamp(0, 1), reduction="none")
        terms["bce"] = (bce * w).sum() / total
    terms["loss"] = LOSS_CE * terms["ce"] + LOSS_L1 * terms["l1"] + LOSS_BCE * terms.get("bce", 0.0)
    # expected accepted length per block (teacher-forced analytic acceptance): a proxy of tau
    survive = torch.cumprod(torch.where(valid, accept, torch.zeros_like(accept)), dim=-1)
    terms["tau_proxy"] = (1 + survive.sum(-1)).mean().detach()
    return terms


# ------------------------------------------------------------- evaluation


def evaluate_tau(target: TargetModel, drafter: DSparkDrafter, prompt_ids: List[List[int]], new_tokens: int,
                 temperature: float, seed: int, stop_tokens: Sequence[int] = (),
                 recorder: Optional[CalibrationRecorder] = None) -> Dict[str, float]:
    drafter.eval()
    engine = SpeculativeEngine(target, drafter, max_concurrency=len(prompt_ids),
                               max_model_len=max(len(p) for p in prompt_ids) + new_tokens, seed=seed,
                               recorder=recorder)
    params = [SamplingParams(temperature=temperature, seed=seed + i, max_new_tokens=new_tokens,
                             stop_tokens=stop_tokens) for i in range(len(prompt_ids))]
    engine.generate(prompt_ids, params)
    m = engine.metrics
    return {"tau": m.tau, "acceptance_by_position": m.acceptance_by_position, "rounds": m.request_rounds,
            "position_trials": list(m.position_trials), "tokens": m.generated_tokens}


# ------------------------------------------------------------- training


def lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_drafter(target: TargetModel, data: Sequences, config: TrainConfig, out: Optional[Path] = None,
                  eval_sets: Optional[Dict[str, List[List[int]]]] = None, stop_tokens: Sequence[int] = (),
                  progress: bool = True, log: Callable[[str], None] = print,
                  normalisers: Optional[Dict[str, List[Optional[torch.Tensor]]]] = None
                  ) -> Tuple[DSparkDrafter, List[dict]]:
    """Trains a drafter on prepared data; returns it (float32, eval mode) and the log.

    ``normalisers``: a dict the caller keeps across runs on the same ``data``
    and target (``bench drafters`` trains twelve drafters on one data set).
    The full-vocabulary ``log sum exp`` of every position depends on neither
    the drafter nor its draft vocabulary, only on the target, the data and
    the dtype of the products, so it is computed by the first run that needs
    it and read by the others."""
    config.validate()
    for p in target.parameters():
        p.requires_grad_(False)
    device = next(target.parameters()).device
    draft_vocab = frequent_tokens(data, config.draft_vocab, target.config.vocab_size) if config.draft_vocab else None
    drafter = new_drafter(target, config, config.seed, draft_vocab).to(device)
    if data.layer_ids != drafter.config.target_layer_ids:
        raise ValueError(f"the data holds target layers {data.layer_ids}, the drafter reads "
                         f"{drafter.config.target_layer_ids}")
    usable = [i for i in range(len(data)) if len(data.tokens[i]) - data.prompt_lens[i] >= 2]
    if not usable:
        raise ValueError("no training sequence has two generated tokens")
    # the target's own continuations and the offline texts, drawn with probability offline_mix
    pools = {kind: [i for i in usable if data.kinds[i] == kind] for kind in ("generated", "offline")}
    mix = config.offline_mix if pools["generated"] and pools["offline"] else float(bool(pools["offline"]))
    amp = autocast_dtype(device) if config.autocast else None
    teacher = Teacher.of(drafter, target, amp or torch.float32)
    lse = None
    if drafter.config.draft_vocab_size:
        key = f"{teacher.weight.dtype}@{teacher.weight.device}"
        lse = (normalisers or {}).get(key)
        if lse is None:
            started = time.perf_counter()
            lse = teacher.log_normalisers(data, usable, progress=progress)
            log(f"p_t normalisers of {sum(lse[i].numel() for i in usable)} positions "
                f"({time.perf_counter() - started:.0f} s)")
            if normalisers is not None:
                normalisers[key] = lse
    decay = [p for n, p in drafter.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in drafter.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    rng = random.Random(config.seed)
    history: List[dict] = []
    bar = _bar(progress, config.steps, "training")
    start = time.perf_counter()
    running: Dict[str, float] = {}
    for step in range(config.steps):
        drafter.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        indices = []
        for _ in range(config.sequences_per_step):
            pool = pools["offline"] if rng.random() < mix else pools["generated"]
            indices.append(pool[rng.randrange(len(pool))])
        blocks = draw_blocks(data, indices, config, rng, config.mask_token_id, device, lse)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            terms = loss_terms(drafter, target, blocks, teacher)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), config.grad_clip)
        optimizer.step()
        for k, v in terms.items():
            value = float(v.detach())
            running[k] = 0.95 * running.get(k, value) + 0.05 * value
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{running['loss']:.3f}", tau_proxy=f"{running['tau_proxy']:.2f}")
        bar.update(1)
        last = step + 1 == config.steps
        if (config.eval_every and (step + 1) % config.eval_every == 0) or last:
            entry = {"step": step + 1, "seconds": round(time.perf_counter() - start, 1), "lr": lr_at(step, config),
                     **{k: round(v, 4) for k, v in running.items()}}
            for domain, prompts in (eval_sets or {}).items():
                result = evaluate_tau(target, drafter, prompts, config.eval_new_tokens, config.eval_temperature,
                                      config.seed + 7, stop_tokens)
                entry[f"tau_{domain}"] = round(result["tau"], 3)
            history.append(entry)
            log(json.dumps(entry))
            if out is not None:
                save_checkpoint(drafter, out, config, history)
    bar.close()
    drafter.eval()
    return drafter, history


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bfloat16 where the device multiplies it natively (CUDA; a CPU with AMX or
    AVX512-BF16), else None (float32 training)."""
    from .precision import native_bfloat16

    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and native_bfloat16() else None


def save_checkpoint(drafter: DSparkDrafter, out: Path, config: TrainConfig, history: List[dict]) -> None:
    dtype = getattr(torch, config.save_dtype)
    copy = DSparkDrafter(drafter.config)
    copy.load_state_dict({k: v.cpu() for k, v in drafter.state_dict().items()})
    copy.sts = drafter.sts
    copy.to(dtype).save(out, copies=False)  # dspark's layout; drafter.save(folder, target) adds DeepSpec's copies
    (out / "training.json").write_text(json.dumps({"config": config.to_dict(), "history": history}, indent=1))


def calibrate(target: TargetModel, drafter: DSparkDrafter, prompt_ids: List[List[int]], new_tokens: int, seed: int,
              stop_tokens: Sequence[int] = ()) -> dict:
    """Fits STS on held-out rounds (temperature 1, Fixed policy) and sets drafter.sts."""
    recorder = CalibrationRecorder()
    drafter.sts = None
    evaluate_tau(target, drafter, prompt_ids, new_tokens, 1.0, seed, stop_tokens, recorder)
    sts, report = recorder.fit()
    drafter.sts = sts
    return {"temperatures": sts.temperatures, "report": report}


def data_key(target_folder: Path, config: TrainConfig, layer_ids: List[int], code_root=None, text_folder=None,
             device: str = "cpu", kind: str = "generated", dtype: str = "float32") -> str:
    """A cache key for the data of one kind ("generated" or "offline"): what changes it."""
    from . import corpus

    parts = {"target": str(Path(target_folder).resolve()), "layers": layer_ids, "domains": list(config.domains),
             "seed": config.seed, "code": str(code_root or corpus.stdlib_dir()),
             "text": str(text_folder or corpus.FORTUNES_DIR), "python": sys.version.split()[0], "device": device,
             "dtype": dtype, "kind": kind}
    if kind == "generated":
        parts.update(prompts=config.train_prompts, max_prompt=config.max_prompt_tokens, max_new=config.max_new_tokens,
                     concurrency=config.generation_concurrency, version=2 if dtype == "float32" else 3)
        if dtype == "float32":  # the keys of the caches written before the data dtype existed
            for name in ("dtype", "kind"):
                parts.pop(name)
    elif kind == "requests":
        parts.update(requests=config.requests, max_prompt=config.max_prompt_tokens, max_new=config.max_new_tokens,
                     concurrency=config.generation_concurrency, request_tokens=REQUEST_MAX_TOKENS,
                     request_chars=list(REQUEST_CHARS), version=1)
    else:
        parts.update(tokens=config.offline_tokens, max_tokens=config.offline_max_tokens, version=1)
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def data_target(target_dir: Path, config: TrainConfig, device: str, target: Optional[TargetModel] = None
                ) -> Tuple[TargetModel, str]:
    """The target the data is made with: in ``config.data_dtype`` (``auto``: the
    dtype the engine's ``--dtype auto`` picks here without measuring, which is
    the demo's), so the drafter learns the target as it is decoded."""
    from .precision import choose

    dtype, _ = choose(config.data_dtype, device)
    name = str(dtype).replace("torch.", "")
    if target is not None and next(target.parameters()).dtype == dtype:
        return target, name
    return TargetModel.load(target_dir, dtype=dtype, device=device), name


def prepare_data(target_dir: Path, config: TrainConfig, device: str = "cpu", cache: Optional[Path] = None,
                 progress: bool = True, code_root=None, text_folder=None, target: Optional[TargetModel] = None
                 ) -> Sequences:
    """The training data of ``config`` (each kind cached on its own): the target's
    continuations of ``train_prompts`` prompts and ``offline_tokens`` teacher-forced
    tokens of offline texts."""
    from . import corpus
    from .smollm2 import cache_dir
    from .tokenizer import Tokenizer, stop_tokens

    folder = cache or cache_dir() / "train-data"
    tokenizer = Tokenizer(target_dir)
    stops = stop_tokens(target_dir)
    model, dtype = data_target(target_dir, config, device, target)
    layer_ids = config.target_layer_ids or default_layer_ids(model.config.num_hidden_layers)
    parts = []
    if config.train_prompts > 0:
        prompts = domain_prompts(config.domains, "train", config.train_prompts, config.seed, code_root, text_folder)
        path = folder / f"{data_key(target_dir, config, layer_ids, code_root, text_folder, device, 'generated', dtype)}.pt"
        print(f"data: {len(prompts)} prompts continued by the target in {dtype} (cache {path})", file=sys.stderr)
        parts.append(build_data(model, tokenizer, prompts, config, layer_ids, stops, path, progress))
    if config.requests > 0:
        path = folder / f"{data_key(target_dir, config, layer_ids, code_root, text_folder, device, 'requests', dtype)}.pt"
        print(f"data: {config.requests} chat requests written and continued by the target in {dtype} (cache {path})",
              file=sys.stderr)

        def requests():
            return self_requests(model, tokenizer, config.requests, "train", config.seed, stops,
                                 config.generation_concurrency, progress)

        parts.append(build_data(model, tokenizer, requests, config, layer_ids, stops, path, progress))
    if config.offline_tokens > 0:
        texts = {d: corpus.offline_texts(d, "train", code_root if d == "code" else text_folder)
                 for d in config.domains}
        path = folder / f"{data_key(target_dir, config, layer_ids, code_root, text_folder, device, 'offline', dtype)}.pt"
        print(f"data: {config.offline_tokens} teacher-forced tokens of offline texts in {dtype} (cache {path})",
              file=sys.stderr)
        parts.append(build_offline_data(model, tokenizer, texts, config, layer_ids, stops[0] if stops else None,
                                        path, progress))
    return Sequences.concat(parts)


def domain_prompts(domains: Sequence[str], split: str, count: int, seed: int, code_root=None, text_folder=None):
    """`count` prompts spread evenly over the domains."""
    from . import corpus

    out = []
    per = max(1, count // len(domains))
    for d in domains:
        pool = corpus.code_prompts(split, code_root) if d == "code" else corpus.text_prompts(split, text_folder)
        out += corpus.sample(pool, per, seed)
    return out


def run(target_dir: Path, out: Path, config: TrainConfig, device: str = "cpu", cache: Optional[Path] = None,
        progress: bool = True, code_root=None, text_folder=None) -> DSparkDrafter:
    """The whole recipe: data (cached), training with periodic evaluation, STS,
    the checkpoint in `out`."""
    from .tokenizer import Tokenizer, stop_tokens

    config.validate()
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    target = TargetModel.load(target_dir, device=device)
    tokenizer = Tokenizer(target_dir)
    stops = stop_tokens(target_dir)
    data = prepare_data(target_dir, config, device, cache, progress, code_root, text_folder)
    data_seconds = time.perf_counter() - started
    print(f"data: {data.generated_tokens('generated')} generated and {data.generated_tokens('offline')} offline "
          f"tokens ({data_seconds / 60:.1f} min)", file=sys.stderr)
    held = domain_prompts(config.domains, "held-out", (config.eval_prompts + config.calibration_prompts)
                          * len(config.domains), config.seed + 1, code_root, text_folder)
    eval_sets: Dict[str, List[List[int]]] = {}
    calibration: List[List[int]] = []
    for d in config.domains:
        ids = encode_prompts(tokenizer, [p for p in held if p.domain == d], config.max_prompt_tokens)
        eval_sets[d] = ids[:config.eval_prompts]
        calibration += ids[config.eval_prompts:]
    out.mkdir(parents=True, exist_ok=True)
    drafter, history = train_drafter(target, data, config, out, eval_sets, stops, progress,
                                     log=lambda s: print(s, file=sys.stderr))
    save_checkpoint(drafter, out, config, history)
    # from here on, the weights as saved (save_dtype), in float32 as the engine runs them here
    drafter = DSparkDrafter.load(out, target, device=device)
    if config.confidence and calibration:
        result = calibrate(target, drafter, calibration, config.eval_new_tokens, config.seed + 11, stops)
        print(f"STS temperatures: {[round(t, 3) for t in result['temperatures']]}", file=sys.stderr)
        drafter.sts.save(out)
    final = {d: round(evaluate_tau(target, drafter, ids, config.eval_new_tokens, config.eval_temperature,
                                   config.seed + 7, stops)["tau"], 3) for d, ids in eval_sets.items()}
    history.append({"step": config.steps, "saved_weights": True, **{f"tau_{d}": v for d, v in final.items()}})
    # the goal's measurement: greedy, as decoded by the demo (its dtype), on held-out and on the demo's prompts
    from .corpus import DEMO_PROMPTS

    model, dtype = data_target(target_dir, config, device, target)
    shipped = DSparkDrafter.load(out, model, dtype=next(model.parameters()).dtype, device=device)
    report = {"dtype": dtype, "new_tokens": config.eval_new_tokens}
    for d, ids in eval_sets.items():
        sets = {"held-out": ids}
        if d in DEMO_PROMPTS:
            sets["demo"] = encode_prompts(tokenizer, [corpus_prompt(t) for t in DEMO_PROMPTS[d]],
                                          config.max_prompt_tokens)
        if d == "text" and config.requests > 0:  # the target's own held-out requests: chat use, not the demo's
            sets["requests"] = encode_prompts(tokenizer, self_requests(model, tokenizer, 2 * config.eval_prompts,
                                                                       "held-out", config.seed + 3, stops,
                                                                       progress=False), config.max_prompt_tokens)
        for name, prompts in sets.items():
            result = evaluate_tau(model, shipped, prompts, config.eval_new_tokens, 0.0, config.seed + 7, stops)
            report[f"{d}/{name}"] = {"prompts": len(prompts), "tau": round(result["tau"], 3),
                                     "rounds": result["rounds"],
                                     "acceptance_by_position": json_rates(result["acceptance_by_position"], 3),
                                     "position_trials": result["position_trials"]}
            print(f"greedy {d} {name}: tau {result['tau']:.2f}", file=sys.stderr)
    times = {"data_seconds": round(data_seconds, 1), "total_seconds": round(time.perf_counter() - started, 1),
             "generated_tokens": data.generated_tokens("generated"), "offline_tokens": data.generated_tokens("offline")}
    (out / "training.json").write_text(json.dumps({"config": config.to_dict(), "history": history, "time": times,
                                                   "greedy": report}, indent=1, allow_nan=False))
    print(json.dumps(history[-1]), file=sys.stderr)
    return drafter


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def corpus_prompt(text: str):
    """A demo prompt (a chat turn) as the corpora's Prompt."""
    from .corpus import Prompt

    return Prompt(text, True, "demo", "demo")


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc)
    except ImportError:
        return _NoBar()
