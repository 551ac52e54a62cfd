"""FlashInfer's ``chain_speculative_sampling`` over :func:`dspark.ops.rejection_sample`.

FlashInfer (``flashinfer/sampling.py``) verifies ``B`` requests of ``n``
drafts each in a padded layout: ``draft_probs [B, n, V]``, ``draft_token_ids
[B, n]``, ``target_probs [B, n + 1, V]`` (probabilities, the last row of each
request for the bonus token). It returns ``output_token_ids [B, n + 1]``
(``-1`` padded, the draft ids' dtype), ``output_accepted_token_num [B]`` (the
drafts that pass their acceptance test, each position tested on its own, as
if no earlier one had been rejected: a statistic of the drafter) and
``output_emitted_draft_token_num [B]`` (the drafts emitted: accepted before
the first rejection; the correction or bonus token is not counted). Given
counters are added to in place, as FlashInfer does.

Semantic differences that remain (dspark's rule is exact either way):

* Target probabilities enter the op through their logarithm (the op's target
  rows are logits): it normalises ``exp(log q)``, which equals ``q / sum q``
  up to float32 rounding. Draft probabilities are taken as given (clamped to
  [0, 1] and normalised).
* The acceptance tests behind ``output_accepted_token_num`` at positions after
  the first rejection use ``torch.rand`` (from ``generator``), not the op's
  streams: they decide nothing, they only count.
* When the residual has no mass, dspark draws from ``p_t``; FlashInfer's
  result is the last id (older kernels) or unspecified.
* A draft id of ``-1`` ends the request's drafts (dspark's placeholder);
  FlashInfer does not check ids. Other out-of-range ids raise ``ValueError``.
* ``deterministic`` is accepted and ignored: dspark is always deterministic.
  Random numbers are dspark's counter-based streams: outputs differ from
  FlashInfer's sample by sample, with the same distribution.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import ops

__all__ = ["chain_speculative_sampling"]


def chain_speculative_sampling(
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    maybe_output_accepted_token_num: Optional[torch.Tensor] = None,
    maybe_output_emitted_draft_token_num: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's chain speculative sampling: ``(output_token_ids [B, n + 1],
    output_accepted_token_num [B], output_emitted_draft_token_num [B])``."""
    name = "chain_speculative_sampling"
    if draft_probs.dim() != 3 or draft_token_ids.dim() != 2 or target_probs.dim() != 3:
        raise ValueError(f"{name}: expected draft_probs [B, n, V], draft_token_ids [B, n] and target_probs "
                         f"[B, n + 1, V], got {list(draft_probs.shape)}, {list(draft_token_ids.shape)} and "
                         f"{list(target_probs.shape)}")
    B, n, V = draft_probs.shape
    if tuple(draft_token_ids.shape) != (B, n) or tuple(target_probs.shape) != (B, n + 1, V):
        raise ValueError(f"{name}: shapes disagree: draft_probs {list(draft_probs.shape)}, draft_token_ids "
                         f"{list(draft_token_ids.shape)}, target_probs {list(target_probs.shape)}")
    device = target_probs.device
    cu = torch.arange(B + 1, dtype=torch.int32, device=device) * n  # the padded layout, flattened
    target_logits = torch.log(target_probs.reshape(B * (n + 1), V).to(torch.float32))
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                 device=generator.device if generator is not None else "cpu"))
    out = ops.rejection_sample(
        target_logits, draft_token_ids.reshape(-1), cu, draft_probs=draft_probs.reshape(B * n, V),
        temperature=1.0, seed=seed, offset=0 if offset is None else offset, max_num_draft=n)
    tokens = out.output_tokens.to(draft_token_ids.dtype)
    emitted = out.num_accepted
    # accepted: each position's own test (the rejected position and those after it re-tested)
    ids = draft_token_ids.long().clamp(min=0)
    p_t = target_probs[:, :n].gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
    p_d = draft_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
    u = torch.rand(B, n, generator=generator, device=generator.device if generator is not None else "cpu").to(device)
    passes = (u * p_d < p_t) & (draft_token_ids >= 0)
    positions = torch.arange(n, device=device).unsqueeze(0)
    later = positions >= emitted.unsqueeze(-1).long()
    accepted = emitted + (passes & later).sum(-1).to(torch.int32)
    if maybe_output_accepted_token_num is not None:
        maybe_output_accepted_token_num += accepted.to(maybe_output_accepted_token_num.dtype)
        accepted = maybe_output_accepted_token_num
    if maybe_output_emitted_draft_token_num is not None:
        maybe_output_emitted_draft_token_num += emitted.to(maybe_output_emitted_draft_token_num.dtype)
        emitted = maybe_output_emitted_draft_token_num
    return tokens, accepted, emitted
