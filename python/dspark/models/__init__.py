"""Model architectures over dspark's ops: Llama / Qwen3 targets and the DSpark drafter."""

from .common import CacheFull, CheckpointError, PagedKVCache, RMSNorm
from .drafter import Draft, DrafterConfig, DSparkDrafter, check_compatible
from .target import Batch, TargetConfig, TargetModel, TargetOutput

__all__ = [
    "Batch",
    "CacheFull",
    "CheckpointError",
    "DSparkDrafter",
    "Draft",
    "DrafterConfig",
    "PagedKVCache",
    "RMSNorm",
    "TargetConfig",
    "TargetModel",
    "TargetOutput",
    "check_compatible",
]
