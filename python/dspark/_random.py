"""Where a call's randomness comes from: a torch.Generator, or seeds and offsets.

Every kernel draws from one counter-based stream addressed by (seed, offset,
request, position, purpose, column) (csrc/include/dspark/random.h). This module
turns the user's arguments into the (seed, seeds, offset, offsets) quadruple the
extension takes: scalars travel as Python ints, tensors stay on the device, so
nothing here synchronises with the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

_U64 = (1 << 64) - 1
OFFSET_LIMIT = 1 << 32

SeedArg = Union[int, torch.Tensor, None]
OffsetArg = Union[int, torch.Tensor]


@dataclass
class Randomness:
    seed: int  # a signed 64-bit view of the seed bits (unused when seeds is given)
    seeds: Optional[torch.Tensor]  # int64 [1] (one stream for the batch) or [R] (per request)
    offset: int
    offsets: Optional[torch.Tensor]  # int64 [1] or [R]


def _signed64(x: int) -> int:
    x &= _U64
    return x - (1 << 64) if x >= (1 << 63) else x


def default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


def _to_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on the op's device. A host tensor for a CUDA op is copied (a
    synchronising copy in eager mode); inside CUDA graph capture that copy
    would not be replayed, so it is refused."""
    if t.device != device and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"{op}: argument '{name}' must be on {device} inside CUDA graph capture, got {t.device}")
    return t.to(device).contiguous()


def resolve(
    op: str,
    device: torch.device,
    num_requests: int,
    generator: Optional[torch.Generator],
    seed: SeedArg,
    offset: OffsetArg,
) -> Randomness:
    """Turns generator / seed / offset into what the extension takes.

    - seed=int: one stream for the batch; request r draws with request index r.
    - seed=[R] int64 tensor: one stream per request (request index 0), so a
      request's draws do not depend on its place in the batch.
    - otherwise a seed is drawn from `generator` (default: the device's default
      generator). A CUDA generator draws it on the device, which CUDA graphs
      replay with fresh values.
    """
    if generator is not None and seed is not None:
        raise ValueError(f"{op}: give either 'generator' or 'seed', not both")
    seeds: Optional[torch.Tensor] = None
    seed_value = 0
    if seed is None:
        gen = generator if generator is not None else default_generator(device)
        if gen.device.type == "cuda":
            seeds = torch.randint(
                -(1 << 63), (1 << 63) - 1, (1,), generator=gen, device=gen.device, dtype=torch.int64
            )
            if seeds.device != device:
                seeds = seeds.to(device)
        else:
            seed_value = int(torch.randint(-(1 << 63), (1 << 63) - 1, (1,), generator=gen, dtype=torch.int64))
    elif isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"{op}: argument 'seed' must be an int64 tensor, got {seed.dtype}")
        if seed.dim() != 1 or seed.numel() not in (1, num_requests):
            raise ValueError(
                f"{op}: argument 'seed' must have shape [1] or [R] = [{num_requests}], got {list(seed.shape)}"
            )
        seeds = _to_device(op, "seed", seed, device)
    elif isinstance(seed, int) and not isinstance(seed, bool):
        seed_value = _signed64(seed)
    else:
        raise TypeError(f"{op}: argument 'seed' must be an int or an int64 tensor, got {type(seed).__name__}")

    offsets: Optional[torch.Tensor] = None
    offset_value = 0
    if isinstance(offset, torch.Tensor):
        if offset.dtype != torch.int64:
            raise TypeError(f"{op}: argument 'offset' must be an int64 tensor, got {offset.dtype}")
        if offset.dim() != 1 or offset.numel() not in (1, num_requests):
            raise ValueError(
                f"{op}: argument 'offset' must have shape [1] or [R] = [{num_requests}], got {list(offset.shape)}"
            )
        offsets = _to_device(op, "offset", offset, device)
    elif isinstance(offset, int) and not isinstance(offset, bool):
        if not 0 <= offset < OFFSET_LIMIT:
            raise ValueError(f"{op}: argument 'offset' must be in [0, 2^32), got {offset}")
        offset_value = offset
    else:
        raise TypeError(f"{op}: argument 'offset' must be an int or an int64 tensor, got {type(offset).__name__}")
    return Randomness(seed_value, seeds, offset_value, offsets)
