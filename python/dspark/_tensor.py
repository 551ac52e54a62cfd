"""Plain tensor views handed to the extension (it does not link libtorch)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

# Integer codes of csrc/include/dspark/tensor.h (enum DType).
_DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.uint8: 5,
}

View = Tuple[int, int, int, int, Tuple[int, ...], Tuple[int, ...]]


def view(t: Optional[torch.Tensor], op: str, name: str) -> Optional[View]:
    """(data_ptr, dtype code, device type, device index, shape, strides), or None."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{op}: argument '{name}' has unsupported dtype {t.dtype}")
    if t.device.type == "cpu":
        device_type, index = 0, 0
    elif t.device.type == "cuda":
        device_type, index = 1, t.device.index if t.device.index is not None else torch.cuda.current_device()
    else:
        raise TypeError(f"{op}: argument '{name}' is on unsupported device {t.device}")
    return (t.data_ptr(), code, device_type, index, tuple(t.shape), tuple(t.stride()))


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of the current stream on `device` (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(device).cuda_stream)


def is_capturing(device: torch.device) -> bool:
    """Whether work on `device` is being recorded into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
