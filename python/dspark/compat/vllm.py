"""vLLM's rejection-sampler layout over :func:`dspark.ops.rejection_sample`.

vLLM (``vllm/v1/sample/rejection_sampler.py``) verifies a batch of ``B``
requests with ``num_draft_tokens[i]`` drafts each, flattened into
``draft_token_ids [N]``; the target logits are the ``N`` draft rows (the
bonus token then comes from the caller, ``bonus_token_ids [B, 1]``) or the
``N + B`` rows with each request's bonus row after its draft rows; drafts
come with ``draft_probs [N, V]`` or without (``None``: an n-gram drafter, a
one-hot draft). The output is ``[B, max_spec_len + 1]`` int32: the accepted
drafts, the recovered (or bonus) token, then ``-1``
(``PLACEHOLDER_TOKEN_ID``).

Semantic differences that remain (dspark's rule is exact either way):

* A draft token with ``p_d = 0`` is accepted by dspark iff ``p_t > 0`` (the
  test ``u p_d < p_t``); vLLM rejects it (``draft_prob > 0`` is required).
  Both are lossless.
* vLLM accepts iff ``u <= p_t / p_d``, dspark iff ``u p_d < p_t``: they differ
  only where ``u`` equals the ratio exactly.
* When the residual ``max(0, p_t - p_d)`` has no mass, dspark draws from
  ``p_t``; vLLM's argmax of an all-zero row returns token 0.
* Random numbers are dspark's counter-based streams (Philox by request,
  position and column): a ``torch.Generator`` per request seeds its stream,
  so outputs are reproducible per request but not equal to vLLM's samples
  (the distribution is the same).
* top-k keeps every logit tied with the k-th largest (vLLM's sort-based path
  does; its Triton path trims ties to exactly k); top-p keeps whole tie
  groups at its boundary (vLLM's sort leaves ties to the sort order).
* min-p, when given, truncates every row of the request; vLLM's rejection
  sampler applies only temperature, top-k and top-p to the draft positions.
* Draft ids of ``-1`` end the request's drafts (a rejection there, the token
  drawn from that row's ``p_t``); other out-of-range ids raise ``ValueError``.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch

from .. import ops

__all__ = ["GREEDY_TEMPERATURE_EPS", "PLACEHOLDER_TOKEN_ID", "rejection_sample"]

PLACEHOLDER_TOKEN_ID = -1
# vLLM marks greedy requests with temperature -1 (older) or 0; anything below
# this is greedy here.
GREEDY_TEMPERATURE_EPS = 1e-5


def _per_request(values: Optional[Union[torch.Tensor, Sequence[float]]], B: int, dtype: torch.dtype,
                 device: torch.device, name: str) -> Optional[torch.Tensor]:
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=dtype, device=device).reshape(-1)
    if t.numel() != B:
        raise ValueError(f"vllm.rejection_sample: argument '{name}' must have B = {B} entries, got {t.numel()}")
    return t


def rejection_sample(
    draft_token_ids: torch.Tensor,
    num_draft_tokens: Union[Sequence[int], torch.Tensor],
    draft_probs: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    bonus_token_ids: Optional[torch.Tensor] = None,
    *,
    temperature: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    all_greedy: bool = False,
    top_k: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    top_p: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    min_p: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    generators: Optional[Dict[int, torch.Generator]] = None,
    generator: Optional[torch.Generator] = None,
    max_spec_len: Optional[int] = None,
) -> torch.Tensor:
    """vLLM's ``RejectionSampler`` step: ``[B, max_spec_len + 1]`` int32 output
    tokens, ``-1`` padded.

    Args:
        draft_token_ids: ``[N]`` int32 / int64 drafts of all requests, flattened.
        num_draft_tokens: ``[B]`` drafts per request (a list or a tensor).
        draft_probs: ``[N, V]`` the drafter's probabilities, or None (one-hot
            drafts, vLLM's n-gram mode).
        target_logits: ``[N, V]`` when ``bonus_token_ids`` is given, else
            ``[N + B, V]`` (each request's bonus row after its draft rows).
        bonus_token_ids: ``[B, 1]`` (or ``[B]``) bonus tokens the caller drew,
            or None (the op draws them from the bonus rows).
        temperature: ``[B]``; below 1e-5 (vLLM's 0 or -1) is greedy. None with
            ``all_greedy`` is all greedy, else all 1.
        top_k / top_p / min_p: ``[B]`` or None; ``top_k <= 0`` or ``>= V`` is off.
        generators: per-request generators ``{request index: generator}``; each
            seeds that request's stream. Other requests take seeds from
            ``generator`` (default: the device's default generator).
        max_spec_len: the output width minus one (default: the largest count;
            give it under CUDA graph capture).
    """
    device = target_logits.device
    counts = torch.as_tensor(num_draft_tokens, dtype=torch.int64).reshape(-1)
    B = counts.numel()
    cu = torch.zeros(B + 1, dtype=torch.int32)
    if B:
        cu[1:] = torch.cumsum(counts, 0).to(torch.int32)
    if max_spec_len is None:
        max_spec_len = int(counts.max()) if B else 0
    if all_greedy or temperature is None:
        temps = torch.zeros(B) if all_greedy else torch.ones(B)
    else:
        temps = _per_request(temperature, B, torch.float32, torch.device("cpu"), "temperature").cpu()
        temps = torch.where(temps < GREEDY_TEMPERATURE_EPS, torch.zeros_like(temps), temps)
    kwargs = {}
    ks = _per_request(top_k, B, torch.int64, torch.device("cpu"), "top_k")
    if ks is not None:
        V = target_logits.shape[-1]
        kwargs["top_k"] = torch.where((ks <= 0) | (ks >= V), torch.zeros_like(ks), ks).to(torch.int32).to(device)
    if top_p is not None:
        kwargs["top_p"] = _per_request(top_p, B, torch.float32, device, "top_p")
    if min_p is not None:
        kwargs["min_p"] = _per_request(min_p, B, torch.float32, device, "min_p")
    if bonus_token_ids is not None:
        kwargs["bonus_tokens"] = bonus_token_ids.reshape(-1).to(device)
    seeds = torch.randint(0, 2**62, (B,), generator=generator, device=generator.device if generator else "cpu")
    for index, g in (generators or {}).items():
        seeds[index] = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
    out = ops.rejection_sample(
        target_logits, draft_token_ids.to(device), cu.to(device),
        draft_probs=draft_probs, temperature=temps.to(device), seed=seeds.to(device),
        max_num_draft=max_spec_len, **kwargs)
    return out.output_tokens


def parse_output(output_token_ids: torch.Tensor, vocab_size: int) -> list:
    """vLLM's ``parse_output``: each row's tokens, placeholders dropped."""
    rows = output_token_ids.cpu().tolist()
    return [[t for t in row if t != PLACEHOLDER_TOKEN_ID and t < vocab_size] for row in rows]
