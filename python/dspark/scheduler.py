"""Confidence-scheduled verification: throughput profiles and the policies an
engine calls every round (DSPARK.md, section 3).

Every policy maps the round's calibrated conditional confidences ``conf``
``[R, gamma]`` (and an optional ``cap`` ``[R]``) to verification lengths ``[R]``
int32 on the same device, with no host synchronisation.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch

from . import ops

__all__ = [
    "AsyncHardwareAware",
    "Fixed",
    "HardwareAware",
    "Policy",
    "SPSTable",
    "Threshold",
]


# --------------------------------------------------------------------------
# Throughput profiles


@dataclass
class SPSTable:
    """Target forward steps per second at ``B`` batch tokens, ``B = 0..B_max``.

    Entry 0 is unused (0.0). The measured curve is kept as it is: real curves
    are jagged (kernel tile boundaries, CUDA graph buckets), and the scheduler's
    point is to exploit exactly that.
    """

    steps_per_second: List[float]
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.steps_per_second) < 2:
            raise ValueError("SPSTable: need entries for B = 0 and at least B = 1")
        bad = [b for b, v in enumerate(self.steps_per_second) if not (v >= 0.0 and v < float("inf"))]
        if bad:
            raise ValueError(f"SPSTable: entries must be finite and >= 0; bad at B = {bad[:5]}")

    @property
    def max_batch_tokens(self) -> int:
        return len(self.steps_per_second) - 1

    def __call__(self, batch_tokens: int) -> float:
        return self.steps_per_second[batch_tokens] if 0 <= batch_tokens <= self.max_batch_tokens else 0.0

    def tensor(self, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """The ``[B_max + 1]`` float32 table that schedule_prefix takes."""
        return torch.tensor(self.steps_per_second, dtype=torch.float32, device=device)

    @classmethod
    def from_curve(cls, curve: Callable[[int], float], max_batch_tokens: int, **meta: Any) -> "SPSTable":
        return cls([0.0] + [float(curve(b)) for b in range(1, max_batch_tokens + 1)], dict(meta))

    @classmethod
    def profile(
        cls,
        forward: Callable[[int], Any],
        max_batch_tokens: int,
        *,
        warmup: int = 2,
        repeats: int = 5,
        device: Union[str, torch.device, None] = None,
        batch_sizes: Optional[Iterable[int]] = None,
        progress: bool = False,
        timer: Callable[[], float] = time.perf_counter,
    ) -> "SPSTable":
        """Times ``forward(B)`` (a target forward over ``B`` batch tokens) for every
        ``B`` in ``[1, max_batch_tokens]`` (or ``batch_sizes``): ``warmup`` calls, then
        the median of ``repeats`` timed calls. On CUDA each call is timed with
        events on the current stream (elsewhere with ``timer``). Unprofiled sizes
        get 0 (not admitted)."""
        if max_batch_tokens < 1:
            raise ValueError(f"SPSTable.profile: max_batch_tokens must be >= 1, got {max_batch_tokens}")
        device = torch.device(device) if device is not None else None
        sizes = list(batch_sizes) if batch_sizes is not None else list(range(1, max_batch_tokens + 1))
        table = [0.0] * (max_batch_tokens + 1)
        iterator: Iterable[int] = sizes
        if progress:
            try:
                from tqdm import tqdm

                iterator = tqdm(sizes, desc="profiling SPS", unit="B")
            except ImportError:
                pass
        for b in iterator:
            if not 1 <= b <= max_batch_tokens:
                raise ValueError(f"SPSTable.profile: batch size {b} outside [1, {max_batch_tokens}]")
            for _ in range(warmup):
                forward(b)
            times = []
            for _ in range(repeats):
                if device is not None and device.type == "cuda":
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    forward(b)
                    stop.record()
                    stop.synchronize()
                    times.append(start.elapsed_time(stop) * 1e-3)
                else:
                    t0 = timer()
                    forward(b)
                    times.append(timer() - t0)
            table[b] = 1.0 / max(statistics.median(times), 1e-12)
        meta = {"warmup": warmup, "repeats": repeats, "device": str(device) if device else "cpu",
                "profiled": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return cls(table, meta)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps({"steps_per_second": self.steps_per_second, "meta": self.meta}, indent=1))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SPSTable":
        data = json.loads(Path(path).read_text())
        return cls([float(x) for x in data["steps_per_second"]], dict(data.get("meta", {})))


# --------------------------------------------------------------------------
# Policies


class Policy:
    """Chooses per-request verification lengths each round."""

    name = "policy"

    def __call__(self, conf: torch.Tensor, cap: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
        """Lengths ``[R]`` for confidences ``[R, gamma]``; ``validate=False`` skips
        schedule_prefix's value checks (a synchronisation on CUDA)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forgets history (start of a new run)."""

    @property
    def max_length(self) -> Optional[int]:
        """The longest verification length the policy can choose (None: any);
        an engine drafts no further."""
        return None


class Fixed(Policy):
    """Verify ``min(gamma, cap)`` (``gamma = 1`` is the MTP-1 production baseline);
    ``gamma=None`` verifies the whole drafted block."""

    def __init__(self, gamma: Optional[int] = None) -> None:
        if gamma is not None and gamma < 0:
            raise ValueError(f"Fixed: gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.name = f"fixed({gamma if gamma is not None else 'gamma'})"

    @property
    def max_length(self) -> Optional[int]:
        return self.gamma

    def __call__(self, conf: torch.Tensor, cap: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
        if self.gamma is not None and self.gamma < conf.shape[1]:
            conf = conf[:, : self.gamma]
        return ops.schedule_prefix(conf, mode="fixed", cap=cap, validate=validate).lengths


class Threshold(Policy):
    """Verify up to the first position whose confidence is below ``threshold``
    (the rule of the reference code)."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = float(threshold)
        self.name = f"threshold({self.threshold:g})"

    def __call__(self, conf: torch.Tensor, cap: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
        return ops.schedule_prefix(conf, mode="threshold", threshold=self.threshold, cap=cap,
                                   validate=validate).lengths


def _sps_tensor(sps: Union[SPSTable, torch.Tensor, Sequence[float]], device: torch.device) -> torch.Tensor:
    if isinstance(sps, SPSTable):
        return sps.tensor(device)
    return torch.as_tensor(sps, dtype=torch.float32).to(device)


class HardwareAware(Policy):
    """The paper's Algorithm 1 (causal, with early stopping): lossless and
    synchronous: it decides from the current round's confidences."""

    name = "hardware-aware"

    def __init__(self, sps: Union[SPSTable, torch.Tensor, Sequence[float]]) -> None:
        self.sps = sps
        self._tables: Dict[torch.device, torch.Tensor] = {}

    def table(self, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = _sps_tensor(self.sps, device)
        return self._tables[device]

    def __call__(self, conf: torch.Tensor, cap: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
        return ops.schedule_prefix(conf, mode="causal", sps=self.table(conf.device), cap=cap,
                                   validate=validate).lengths


class AsyncHardwareAware(HardwareAware):
    """The asynchronous variant (paper, section 5.2): the batch size of step t is
    fixed two steps ahead, so it is known before step t starts.

    At every step t the policy runs the unconstrained global search (no early
    stop, so it steps over cliffs of the SPS curve) on that step's confidences
    and keeps the batch size it found, ``B*_t = R_t + capacity_t``, on the device.
    Step t then verifies ``K_t = max(0, B*_{t-2} - R_t)`` draft tokens: the top
    ``K_t`` candidates by their current survival ``a`` (schedule_prefix's budget
    mode, same tie rule). The admission of a draft never depends on that draft,
    so the policy is lossless.

    Cold start: steps 0 and 1 have no step t - 2; they use the synchronous
    causal scheduler (HardwareAware). Requests joining or leaving between t - 2
    and t: the kept quantity is the batch size, not a per-request length, so
    ``K_t`` absorbs the change (more requests leave fewer draft tokens each; a
    batch that shrank may verify more); ``K_t`` is further limited to the
    current candidates by budget mode. ``reset()`` starts a new cold start.
    """

    name = "async-hardware-aware"

    def __init__(self, sps: Union[SPSTable, torch.Tensor, Sequence[float]]) -> None:
        super().__init__(sps)
        self._batch_tokens: List[torch.Tensor] = []  # B* of steps t - 2 and t - 1, on the device

    def reset(self) -> None:
        self._batch_tokens = []

    def __call__(self, conf: torch.Tensor, cap: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
        table = self.table(conf.device)
        R = conf.shape[0]
        found = ops.schedule_prefix(conf, mode="global", sps=table, cap=cap, validate=validate)
        if len(self._batch_tokens) < 2:
            lengths = ops.schedule_prefix(conf, mode="causal", sps=table, cap=cap, validate=validate).lengths
        else:
            budget = torch.clamp(self._batch_tokens[0] - R, min=0)
            lengths = ops.schedule_prefix(conf, mode="budget", budget=budget, cap=cap, validate=validate).lengths
        self._batch_tokens = (self._batch_tokens + [found.capacity.to(torch.int64) + R])[-2:]
        return lengths
