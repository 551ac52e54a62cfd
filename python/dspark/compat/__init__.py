"""The call layouts of other serving stacks over :func:`dspark.ops.rejection_sample`.

``dspark.compat.vllm.rejection_sample`` takes vLLM's rejection-sampler layout
(ragged ``[N]`` draft ids with per-request counts, target logits with or
without bonus rows, ``[B, 1]`` bonus ids, per-request temperature / top-k /
top-p, ``-1`` padding); ``dspark.compat.flashinfer.chain_speculative_sampling``
takes FlashInfer's (padded ``[B, n]`` drafts, probability inputs, accepted and
emitted counters). Each module's docstring lists the semantic differences
that remain. The adapters only reshape arguments; the op does the work.
"""

from . import flashinfer, vllm

__all__ = ["flashinfer", "vllm"]
