"""Public ops over PyTorch tensors, one module per op family (mirroring
``csrc/{cpu,cuda,ops}``): ``sampling`` (rejection_sample), ``markov``
(markov_sample, confidence), ``schedule`` (schedule_prefix) and ``attention``
(append_kv, paged_attention, rope), and ``linear`` (the models' CPU product);
shared validation is in ``_common``.

Each op validates its arguments (TypeError / ValueError naming the argument),
then runs the CPU or CUDA kernel of the extension on the tensors' device. Ops
are registered as torch.library custom ops in the ``dspark`` namespace with fake
implementations, so they work under torch.compile; on CUDA they launch on the
current stream without allocating from data values or synchronising with the
host, so they can be captured in CUDA graphs.
"""

from __future__ import annotations

from .attention import ATTENTION_MASKS, append_kv, paged_attention, rope, rope_inv_freq
from .linear import linear
from .markov import MARKOV_HEADS, ConfidenceOutput, MarkovOutput, confidence, markov_sample
from .sampling import MAX_PADDING, RejectionOutput, rejection_sample
from .schedule import SCHEDULE_MODES, ScheduleOutput, schedule_prefix

__all__ = [
    "ATTENTION_MASKS",
    "MARKOV_HEADS",
    "MAX_PADDING",
    "SCHEDULE_MODES",
    "append_kv",
    "linear",
    "paged_attention",
    "rope",
    "rope_inv_freq",
    "ConfidenceOutput",
    "MarkovOutput",
    "RejectionOutput",
    "ScheduleOutput",
    "confidence",
    "markov_sample",
    "rejection_sample",
    "schedule_prefix",
]
