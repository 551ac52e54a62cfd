"""Random ragged batches for rejection_sample, and the comparison with the
reference that tolerates only decisions within float32 rounding of their
threshold (see dspark.reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch


# A decision closer than this (relative) to its threshold may legitimately go
# either way between float32 kernels and the float64 oracle.
MARGIN = 1e-4


@dataclass
class Batch:
    target_logits: torch.Tensor
    draft_tokens: torch.Tensor
    cu_num_draft: torch.Tensor
    draft_logits: torch.Tensor
    draft_probs: torch.Tensor
    max_num_draft: int

    def kwargs(self, mode: str) -> Dict[str, torch.Tensor]:
        if mode == "logits":
            return {"draft_logits": self.draft_logits}
        if mode == "probs":
            return {"draft_probs": self.draft_probs}
        return {}

    def to(self, device) -> "Batch":
        return Batch(
            self.target_logits.to(device),
            self.draft_tokens.to(device),
            self.cu_num_draft.to(device),
            self.draft_logits.to(device),
            self.draft_probs.to(device),
            self.max_num_draft,
        )


def random_batch(
    num_requests: int,
    vocab: int,
    max_num_draft: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    spread: float = 3.0,
    agreement: float = 1.0,
    token_dtype: torch.dtype = torch.int64,
) -> Batch:
    """Target logits ~ N(0, spread); draft logits = target + N(0, agreement) for
    the paired row, so acceptance is neither always nor never; draft tokens are
    drawn from the draft distribution; 0..max_num_draft drafts per request."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, max_num_draft + 1, (num_requests,), generator=g)
    cu = torch.zeros(num_requests + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(n, 0).to(torch.int32)
    total = int(cu[-1])
    target = torch.randn(total + num_requests, vocab, generator=g) * spread
    paired = torch.cat([torch.arange(int(cu[r]) + r, int(cu[r + 1]) + r) for r in range(num_requests)]
                       or [torch.zeros(0, dtype=torch.int64)])
    draft = target[paired] + torch.randn(total, vocab, generator=g) * agreement
    probs = torch.softmax(draft, -1)
    tokens = torch.multinomial(probs, 1, generator=g).squeeze(-1) if total else torch.zeros(0, dtype=torch.int64)
    return Batch(
        target.to(dtype),
        tokens.to(token_dtype),
        cu,
        draft.to(dtype),
        probs.to(dtype),
        int(n.max()) if num_requests else 0,
    )


def assert_matches_reference(out, ref, label: str = "") -> int:
    """Tokens and counts equal the reference for every request whose decisions
    were not within MARGIN of a threshold; returns how many were exempt."""
    close = ref.margins < MARGIN
    same = (out.output_tokens.cpu() == ref.output_tokens).all(-1) & (out.num_accepted.cpu() == ref.num_accepted)
    bad = torch.nonzero(~same & ~close).flatten().tolist()
    assert not bad, f"{label}: requests {bad[:10]} differ from the reference"
    assert int(close.sum()) <= max(1, close.numel() // 100), f"{label}: too many near-threshold decisions"
    return int(close.sum())


@dataclass
class SubVocabBatch:
    target_logits: torch.Tensor  # [N + R, V]
    draft_tokens: torch.Tensor  # [N] target ids
    cu_num_draft: torch.Tensor
    draft_logits: torch.Tensor  # [N, V_d]
    draft_probs: torch.Tensor  # [N, V_d]
    draft_vocab: torch.Tensor  # [V_d] int32
    max_num_draft: int

    def kwargs(self, mode: str) -> Dict[str, torch.Tensor]:
        key = "draft_logits" if mode == "logits" else "draft_probs"
        return {key: getattr(self, key), "draft_vocab": self.draft_vocab}

    def to(self, device) -> "SubVocabBatch":
        return SubVocabBatch(*(getattr(self, f).to(device) for f in
                               ("target_logits", "draft_tokens", "cu_num_draft", "draft_logits", "draft_probs",
                                "draft_vocab")), self.max_num_draft)


def sub_vocab_batch(num_requests: int, vocab: int, draft_vocab: int, max_num_draft: int, *, seed: int,
                    dtype: torch.dtype = torch.float32, spread: float = 3.0, agreement: float = 1.0,
                    outside: float = 0.1) -> SubVocabBatch:
    """A batch whose drafter scores `draft_vocab` of the `vocab` target ids (a
    random map in random order): draft logits follow the paired target row at
    the map's ids; draft tokens are drawn from the draft distribution, except a
    fraction `outside` replaced by ids outside the map (p_d = 0 there)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=g)[:draft_vocab]
    n = torch.randint(0, max_num_draft + 1, (num_requests,), generator=g)
    cu = torch.zeros(num_requests + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(n, 0).to(torch.int32)
    total = int(cu[-1])
    target = torch.randn(total + num_requests, vocab, generator=g) * spread
    paired = torch.cat([torch.arange(int(cu[r]) + r, int(cu[r + 1]) + r) for r in range(num_requests)]
                       or [torch.zeros(0, dtype=torch.int64)])
    draft = target[paired][:, ids] + torch.randn(total, draft_vocab, generator=g) * agreement
    probs = torch.softmax(draft, -1)
    columns = torch.multinomial(probs, 1, generator=g).squeeze(-1) if total else torch.zeros(0, dtype=torch.int64)
    tokens = ids[columns]
    absent = torch.ones(vocab, dtype=torch.bool)
    absent[ids] = False
    others = torch.nonzero(absent).flatten()
    if others.numel() and total:
        swap = torch.rand(total, generator=g) < outside
        tokens = torch.where(swap, others[torch.randint(0, others.numel(), (total,), generator=g)], tokens)
    return SubVocabBatch(target.to(dtype), tokens, cu, draft.to(dtype), probs.to(dtype), ids.to(torch.int32),
                         int(n.max()) if num_requests else 0)
