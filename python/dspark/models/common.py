"""Pieces shared by the target and the drafter: RMSNorm, rotary frequencies,
the paged KV cache, and safetensors input/output."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._ext import C
from .._tensor import view as _tensor_view

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A model folder or checkpoint that cannot be loaded (missing or mismatched keys, bad config)."""


class RMSNorm(nn.Module):
    """RMSNorm as Llama and Qwen3 compute it: normalise in float32, scale in the
    input dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused rms_norm computes x * rsqrt(mean(x^2) + eps) in float32
        # (one call instead of six: a decoding step runs 61 of these); the
        # weight then scales in the input dtype, as Llama rounds
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def _packing_available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise"))


def tensor_version(t: torch.Tensor) -> int:
    """The tensor's in-place version counter; -1 for an inference tensor, which
    has none (it can only change inside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def weight_source(t: Optional[torch.Tensor]) -> Optional[tuple]:
    """What identifies a parameter's current values without reading them: its
    storage, in-place version, dtype and shape (None for a missing bias)."""
    if t is None:
        return None
    return (t.data_ptr(), tensor_version(t), t.dtype, tuple(t.shape))


def _serves_inference(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether a packed copy of `weights` may serve a product with x: CPU
    inference on x of the weights' dtype, with no autograd through x or any
    of the weights."""
    return (x.device.type == "cpu" and x.dtype == weights[0].dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))))


def _bfloat16_packing_supported() -> bool:
    """oneDNN packs bfloat16 weights only on CPUs with AVX-512 (BW/VL/DQ) or
    AVX-NE-CONVERT; elsewhere the reorder raises, and bfloat16 linears stay on
    torch's own path."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except RuntimeError:
        return False


class PackedWeight:
    """A linear layer's weight laid out once for oneDNN's CPU matmul.

    Why, for bfloat16: torch's linear runs oneDNN's AMX / AVX512-BF16 matmul,
    which copies the weight into its tiled layout at every call: a fixed cost
    of tens of microseconds per layer and twice the weight traffic, which made
    bfloat16 decoding slower than float32 although it reads half the bytes.
    Packed once, the per-call copy is gone (the same products, the same
    results).

    Why, for float32 (only where :func:`float32_packing_pays`): torch's float32
    linear calls the BLAS it was built with (MKL), whose kernels for the few
    rows of a decoding step are slow on some CPUs (measured on a 2-core AMD
    EPYC, AVX2: SmolLM2's LM head over 8 rows takes 18.6 ms through MKL and
    6.1 ms through oneDNN's packed matmul; the whole target forward over 8
    tokens 81 against 62 ms). On others MKL is as fast, so it is measured.

    The packed copy is extra memory (one more copy of the weight) and is used
    only for inference on the CPU with an unchanged weight.
    """

    def __init__(self, weight: torch.Tensor, rows_hint: int = 8) -> None:
        self.source = weight_source(weight)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)

    def matches(self, weight: torch.Tensor) -> bool:
        return self.source == weight_source(weight)

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), self.packed, bias, "none",
                                               [], "")
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def usable(weight: torch.Tensor) -> bool:
        if weight.device.type != "cpu" or weight.dim() != 2 or not _packing_available():
            return False
        if weight.dtype == torch.bfloat16:
            return _bfloat16_packing_supported()
        return weight.dtype == torch.float32 and float32_packing_pays()


class DsparkWeight:
    """A linear layer's weight served by dspark's own CPU product
    (:func:`dspark.ops.linear`), read in place: no copy, no packing.

    It serves 16-bit weights where oneDNN cannot pack them (CPUs without
    AVX-512): there torch's bfloat16 linear converts the weight at every
    call: over SmolLM2-135M's layers on a 2-core AMD EPYC (AVX2) it took
    several times oneDNN's float32 time from 4 rows on, where this stays
    near or under it up to 8 rows (``python -m dspark bench linear``).
    Float32 weights take it for every row count only when
    ``DSPARK_CPU_LINEAR=dspark`` (:func:`float32_backend` says why), and for
    a few rows within a :class:`SplitWeight`. On AVX2 an output row has the same
    bits whichever rows share the call (the op's contract)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.source = weight_source(weight)
        self.weight = weight.detach()
        self._view = _tensor_view(self.weight, "linear", "weight")
        self._bias: Optional[torch.Tensor] = None  # the last bias seen (held), and its view
        self._bias_view = None

    def matches(self, weight: torch.Tensor) -> bool:
        return self.source == weight_source(weight)

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        # about 10 us of Python a call at one row (a forward makes over 100):
        # the weight's view is made once, the bias's once per bias tensor
        if bias is not self._bias:
            self._bias, self._bias_view = bias, _tensor_view(bias, "linear", "bias")
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = torch.empty(x2.shape[0], self.weight.shape[0], dtype=x.dtype)
        C.linear(_tensor_view(x2, "linear", "x"), self._view, self._bias_view, _tensor_view(y, "linear", "out"))
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def usable(weight: torch.Tensor) -> bool:
        if weight.device.type != "cpu" or weight.dim() != 2 or weight.shape[1] == 0:
            return False
        if weight.dtype == torch.float32:
            return float32_backend() == "dspark"
        # 16-bit weights: oneDNN's packed AMX / AVX512-BF16 matmul where it packs them, dspark's elsewhere
        return weight.dtype in (torch.bfloat16, torch.float16) and not PackedWeight.usable(weight)


class SplitWeight:
    """A float32 weight served by two products by the call's rows: dspark's
    (:class:`DsparkWeight`, in place) for up to :data:`FEW_ROWS` rows, a
    decoding step's and a few requests' verification; oneDNN's packed copy
    (``many``), or torch's BLAS linear when ``many`` is None, above (a
    prefill, a large batch's verification).

    Why: on a 2-core AMD EPYC (AVX2) SmolLM2-135M's float32 forward took
    0.80-0.84x oneDNN's time at 1-16 tokens on dspark's product and
    1.1-1.6x at 32-128 (``matmul_nt`` has register blocks, no cache tiling).
    :func:`float32_few_rows_backend` decides whether it is used. Calls of up
    to 16 rows get the same bits for a row whichever rows share them (AVX2),
    so a one-token step and a verification agree there."""

    def __init__(self, weight: torch.Tensor, many: Optional[PackedWeight]) -> None:
        self.few = DsparkWeight(weight)
        self.many = many
        self.weight = self.few.weight

    def matches(self, weight: torch.Tensor) -> bool:
        return self.few.matches(weight)

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if x.numel() <= FEW_ROWS * x.shape[-1]:
            return self.few(x, bias)
        if self.many is not None:
            return self.many(x, bias)
        return F.linear(x, self.weight, bias)

    @staticmethod
    def usable(weight: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype == torch.float32
                and weight.shape[1] > 0 and float32_backend() != "dspark"
                and float32_few_rows_backend() == "dspark")


CpuWeight = Union[PackedWeight, DsparkWeight, SplitWeight]


def cpu_weight(weight: torch.Tensor, rows_hint: int = 8) -> Optional[CpuWeight]:
    """The weight laid out for this CPU's fastest linear (:class:`PackedWeight`,
    :class:`DsparkWeight` or :class:`SplitWeight` of the two), or None where
    torch's own linear serves it."""
    if SplitWeight.usable(weight):
        return SplitWeight(weight, PackedWeight(weight, rows_hint) if PackedWeight.usable(weight) else None)
    if PackedWeight.usable(weight):
        return PackedWeight(weight, rows_hint)
    if DsparkWeight.usable(weight):
        return DsparkWeight(weight)
    return None


def cpu_weight_usable(weight: torch.Tensor) -> bool:
    """Whether :func:`cpu_weight` lays out ``weight`` (else torch's linear runs)."""
    return SplitWeight.usable(weight) or PackedWeight.usable(weight) or DsparkWeight.usable(weight)


# float32 linears: DSPARK_CPU_LINEAR = "dspark", "onednn", "blas" or "auto" (measured once per
# process); the older DSPARK_CPU_PACK_FLOAT32 = "on" / "off" means "onednn" / "blas"
LINEAR_ENV = "DSPARK_CPU_LINEAR"
PACK_FLOAT32_ENV = "DSPARK_CPU_PACK_FLOAT32"
FLOAT32_BACKENDS = ("dspark", "onednn", "blas")
_PACK_FLOAT32_SHAPE = (16384, 1024)  # 64 MB in float32: larger than a CPU's last-level cache, as model weights are
_PROBE_BYTES = _PACK_FLOAT32_SHAPE[0] * _PACK_FLOAT32_SHAPE[1] * 4
_PROBE_DEFAULT = "four 4096 x 1024 weights"
_PROBE_MAX_N = 16384  # larger products (LM heads, embeddings) are left out of a model's probe shapes
_PACK_FLOAT32_ROWS = (1, 8)  # a decoding step's and a verification's rows per request
_PACK_FLOAT32_REPEATS = 5
_PACK_FLOAT32_GAIN = 0.95  # another product must take under this share of the BLAS time
FEW_ROWS = 16  # rows up to which dspark's float32 product may serve a call (SplitWeight)
_float32_decision: Dict[str, object] = {}


def _linear_setting() -> str:
    """``DSPARK_CPU_LINEAR`` (checked), the older ``DSPARK_CPU_PACK_FLOAT32``
    mapped onto it: ``auto``, ``dspark``, ``onednn`` or ``blas``."""
    import os

    mode = os.environ.get(LINEAR_ENV, "auto").strip().lower()
    if mode not in ("auto",) + FLOAT32_BACKENDS:
        raise ValueError(f"{LINEAR_ENV} must be auto, dspark, onednn or blas, got {mode!r}")
    if mode == "auto":
        legacy = os.environ.get(PACK_FLOAT32_ENV, "auto").strip().lower()
        if legacy not in ("auto", "on", "off"):
            raise ValueError(f"{PACK_FLOAT32_ENV} must be auto, on or off, got {legacy!r}")
        mode = {"on": "onednn", "off": "blas"}.get(legacy, "auto")
    return mode


def _float32_measured(shapes: Optional[Sequence[Tuple[int, int]]]) -> Dict[str, object]:
    if "backend" not in _float32_decision:
        _float32_decision.update(_measure_float32_packing(shapes))
    return _float32_decision


def float32_backend(shapes: Optional[Sequence[Tuple[int, int]]] = None) -> str:
    """Which product runs float32 linears on this CPU: ``"onednn"`` (oneDNN's
    matmul on a packed copy), ``"blas"`` (torch's linear, the BLAS it was
    built with) or, only when asked, ``"dspark"`` (:func:`dspark.ops.linear`
    on the weight as it is). ``DSPARK_CPU_LINEAR`` decides when set to one of
    them (the older ``DSPARK_CPU_PACK_FLOAT32`` = ``on`` / ``off``: oneDNN /
    BLAS); ``auto`` (default) times oneDNN against BLAS for 1 and 8 rows over
    weights larger than the cache (64 MB or more: of the layer ``shapes``
    ``(N, K)`` of the first model packed, :func:`pack_cpu_linears`, else four
    of 4096 x 1024), interleaved, 5 repeats, and packs when oneDNN's median
    total is under 0.95 of BLAS's. Measured once per process (about 0.2-0.5
    s); :func:`float32_packing_report` says what was measured.

    For all rows ``auto`` never takes dspark's float32 product: made for a
    step's few rows (register blocks, no cache tiling), it cost 1.1-1.6x
    oneDNN's time in SmolLM2's forward at 32-128 tokens (a prefill, a large
    batch's verification) on an AVX2 CPU; for up to :data:`FEW_ROWS` rows it
    may (:func:`float32_few_rows_backend`). Every backend computes the same
    products up to summation order, and plain and speculative decoding in one
    engine use the same ones."""
    mode = _linear_setting()
    if mode == "onednn":
        return "onednn" if _packing_available() else "blas"
    if mode != "auto":
        return mode
    return str(_float32_measured(shapes)["backend"])


def float32_few_rows_backend(shapes: Optional[Sequence[Tuple[int, int]]] = None) -> str:
    """Which product runs float32 linears of up to :data:`FEW_ROWS` rows. A
    set ``DSPARK_CPU_LINEAR`` fixes one product for every row count
    (:func:`float32_backend`); under ``auto`` it is dspark's where its AVX2
    kernels run (:func:`dspark.cpu_isa`), else :func:`float32_backend`'s.

    Why by instruction set rather than by a timing: on an AMD EPYC (AVX2, 2
    cores) dspark's product took 0.72-0.85x of oneDNN's time over SmolLM2's
    layers at 1-8 rows (``python -m dspark bench linear``) and the whole
    forward 0.80-0.84x at 1-16 tokens, but a start-up probe of 64 MB read
    0.87-0.97x with a spread that flipped the choice between runs. The AVX2
    kernels stream the weight a fixed distance ahead of the products
    (csrc/cpu/kernels.inc); the AVX-512 ones have not been measured against
    oneDNN at these rows, so they are not taken."""
    if _linear_setting() != "auto":
        return float32_backend(shapes)
    from .._backends import cpu_isa

    return "dspark" if cpu_isa() == "avx2" else float32_backend(shapes)


def float32_packing_pays() -> bool:
    """Whether float32 linears run on oneDNN's packed weights
    (:func:`float32_backend` is ``"onednn"``)."""
    return float32_backend() == "onednn"


def float32_packing_report() -> str:
    """One line on the float32 linear decision ("" before it was measured)."""
    d = _float32_decision
    if "backend" not in d:
        return ""
    where = "on oneDNN packed weights" if d["backend"] == "onednn" else "through BLAS"
    if float32_few_rows_backend() == "dspark":
        where += f", up to {FEW_ROWS} rows on dspark's product (AVX2)"
    return (f"float32 linears {where} (measured for 1 + 8 rows over {d.get('weights', _PROBE_DEFAULT)}: "
            f"oneDNN packed {d['packed_ms']:.2f} ms, BLAS {d['blas_ms']:.2f} ms)")


def interleaved_medians(fns: Dict[object, Callable[[], object]], repeats: int) -> Dict[object, float]:
    """Median seconds of each callable: after one warm-up call of each, every
    repeat times each once, in order, so a drift of the machine moves them
    alike."""
    import statistics
    import time

    for fn in fns.values():
        fn()
    times: Dict[object, List[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(ts) for key, ts in times.items()}


def products_pass(products: Sequence[Callable[[torch.Tensor], torch.Tensor]], weights: Sequence[torch.Tensor],
                  inputs: Sequence[Dict[int, torch.Tensor]]) -> Callable[[], None]:
    """A pass as a forward makes them: for each input set (``{K: x}``), every
    product on the input of its weight's width, right after a small torch op
    on it (in a forward a linear follows a norm or an activation, whose
    OpenMP workers are then still spinning and take cores from another
    thread pool: that belongs in a comparison)."""
    def go() -> None:
        for xs in inputs:
            for fn, w in zip(products, weights):
                fn(F.silu(xs[w.shape[1]]))
    return go


def _probe_weights(shapes: Optional[Sequence[Tuple[int, int]]], gen: torch.Generator
                   ) -> Tuple[List[torch.Tensor], str]:
    """The probe's weights: the distinct layer ``shapes`` (``N < 16384``)
    repeated until they hold 64 MB, else four of 4096 x 1024; and their
    description."""
    kept = sorted({(int(n), int(k)) for n, k in shapes or () if 0 < n < _PROBE_MAX_N and k > 0})
    if not kept:
        rows, cols = _PACK_FLOAT32_SHAPE
        return [torch.randn(rows // 4, cols, generator=gen) * 0.02 for _ in range(4)], _PROBE_DEFAULT
    per_round = sum(n * k * 4 for n, k in kept)
    rounds = -(-_PROBE_BYTES // per_round)
    weights = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(rounds) for n, k in kept]
    listed = ", ".join(f"{n} x {k}" for n, k in kept)
    return weights, f"{len(weights)} weights of the model's layer shapes ({listed}), {rounds * per_round >> 20} MB"


def _measure_float32_packing(shapes: Optional[Sequence[Tuple[int, int]]] = None) -> Dict[str, object]:
    """Times oneDNN's packed matmul against BLAS as a model calls them
    (:func:`products_pass`) over weights of 64 MB or more (larger than a
    CPU's last-level cache; :func:`_probe_weights`)."""
    gen = torch.Generator().manual_seed(0)
    if not _packing_available():
        return {"backend": "blas", "pays": False, "packed_ms": float("nan"), "blas_ms": float("nan"),
                "weights": "nothing (no oneDNN packed matmul in this PyTorch)"}
    with torch.inference_mode():
        weights, described = _probe_weights(shapes, gen)
        widths = {w.shape[1] for w in weights}
        inputs = [{k: torch.randn(m, k, generator=gen) for k in widths} for m in _PACK_FLOAT32_ROWS]
        products: Dict[str, List[Callable[[torch.Tensor], torch.Tensor]]] = {
            "blas": [lambda x, w=w: F.linear(x, w) for w in weights],
            "onednn": [lambda x, p=PackedWeight(w, max(_PACK_FLOAT32_ROWS)): p(x, None) for w in weights]}
        median = interleaved_medians({name: products_pass(fns, weights, inputs) for name, fns in products.items()},
                                     _PACK_FLOAT32_REPEATS)
    b, p = median["blas"], median["onednn"]
    backend = "onednn" if p < _PACK_FLOAT32_GAIN * b else "blas"
    return {"backend": backend, "pays": backend == "onednn", "packed_ms": p * 1e3, "blas_ms": b * 1e3,
            "weights": described}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           packed: Optional[CpuWeight] = None) -> torch.Tensor:
    """F.linear, on the packed weight when it is current and the call is CPU inference."""
    if packed is not None and _serves_inference(x, (weight,)) and packed.matches(weight):
        return packed(x, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoint keys) that runs CPU inference
    on the weight :func:`cpu_weight` lays out after :meth:`pack_cpu` (oneDNN's
    packed copy, or dspark's product), where it lays one out."""

    packed: Optional[CpuWeight] = None

    def pack_cpu(self, rows_hint: int = 8) -> bool:
        self.packed = cpu_weight(self.weight, rows_hint)
        return self.packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)

    def __getstate__(self) -> dict:
        # oneDNN's packed tensor has no storage to copy or pickle: a copy of the
        # layer is unpacked (pack_cpu packs it again)
        state = dict(super().__getstate__())
        state.pop("packed", None)
        return state


class FusedLinears:
    """Linears that read the same input (an attention layer's q / k / v, a gated
    MLP's gate and up), run in CPU inference as one product on one packed
    weight: their rows stacked, packed once (:class:`PackedWeight`).

    Why: at the few rows of a decoding step a CPU linear costs a fixed
    overhead per call besides its weight traffic; SmolLM2-135M's forward makes
    211 of them. Three calls for q / k / v and two for gate / up become one
    each (measured on a 2-core AMD EPYC, float32, together with the fused
    RMSNorm, interleaved, 12 repeats: the target forward over 1 token 0.89x
    and over 8 tokens 0.92x the time). Each output is the product of the same row of x with the same
    weight row as before (the layout of the reduction does not depend on the
    other rows; tests/test_models.py compares them).

    The outputs are the members' outputs, in order, as views of one tensor.
    The fused weight is used only while every member's weight and bias are
    the ones it was made from, for CPU inference (as :func:`linear`)."""

    def __init__(self, linears: Sequence["Linear"], rows_hint: int = 8) -> None:
        self.sources = self._sources(linears)
        self.sizes = [m.weight.shape[0] for m in linears]
        with torch.no_grad():
            self.bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
            self.packed = cpu_weight(torch.cat([m.weight.detach() for m in linears]), rows_hint)

    @staticmethod
    def usable(linears: Sequence["Linear"]) -> bool:
        """Whether the linears can run as one product: two or more, each packable
        (:meth:`PackedWeight.usable`), one dtype, device and input width, and
        all with a bias or none."""
        if len(linears) < 2 or not all(isinstance(m, Linear) for m in linears):
            return False
        first = linears[0].weight
        return (all(m.weight.dtype == first.dtype and m.weight.device == first.device
                    and m.weight.dim() == 2 and m.weight.shape[1] == first.shape[1] for m in linears)
                and len({m.bias is None for m in linears}) == 1
                and all(m.bias is None or m.bias.dtype == first.dtype for m in linears)
                and all(cpu_weight_usable(m.weight) for m in linears))

    @staticmethod
    def _sources(linears: Sequence["Linear"]) -> tuple:
        return tuple(weight_source(t) for m in linears for t in (m.weight, m.bias))

    def current(self, linears: Sequence["Linear"], x: torch.Tensor) -> bool:
        """Whether the fused weight may serve this call: CPU inference on x of
        the weights' dtype (no autograd through x or any member), every member
        unchanged since it was made."""
        return _serves_inference(x, [m.weight for m in linears]) and self.sources == self._sources(linears)

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.packed(x, self.bias).split(self.sizes, dim=-1)


class FusingModule(nn.Module):
    """A module whose linears named by :meth:`fusable` read one input and run as
    one product in CPU inference (:class:`FusedLinears`, made by
    :func:`pack_cpu_linears`); elsewhere each runs on its own. With
    ``keep_members`` the members are also packed one by one, for a module that
    calls some of them alone too."""

    fused: Optional[FusedLinears] = None
    keep_members = False

    def fusable(self) -> Tuple["Linear", ...]:
        raise NotImplementedError

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The outputs of the :meth:`fusable` linears on x, in order."""
        members = self.fusable()
        fused = self.fused
        if fused is not None and fused.current(members, x):
            return fused(x)
        return tuple(m(x) for m in members)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())  # the packed tensor cannot be copied (see Linear)
        state.pop("fused", None)
        return state


def layer_shapes(module: nn.Module) -> List[Tuple[int, int]]:
    """The ``(N, K)`` of the float32 CPU products `module` runs: a
    :class:`FusingModule`'s fusable linears as one (their rows stacked), every
    other :class:`Linear` on its own."""
    shapes, grouped = [], set()
    for m in module.modules():
        if isinstance(m, FusingModule):
            members = m.fusable()
            if all(isinstance(x, Linear) and x.weight.dtype == torch.float32 and x.weight.device.type == "cpu"
                   for x in members) and len({x.weight.shape[1] for x in members}) == 1:
                shapes.append((sum(x.weight.shape[0] for x in members), members[0].weight.shape[1]))
                if not m.keep_members:
                    grouped.update(id(x) for x in members)
    for m in module.modules():
        if (isinstance(m, Linear) and id(m) not in grouped and m.weight.dtype == torch.float32
                and m.weight.device.type == "cpu"):
            shapes.append(tuple(m.weight.shape))
    return shapes


def pack_cpu_linears(module: nn.Module, rows_hint: int = 8) -> int:
    """Packs the linears of `module` for CPU inference where their weights can
    be (:func:`cpu_weight_usable`): each :class:`FusingModule`'s fusable
    linears as one weight (:class:`FusedLinears`), every other :class:`Linear`
    on its own. Returns how many linears were packed."""
    shapes = layer_shapes(module)
    if shapes:
        float32_backend(shapes)  # measured on this model's shapes when it is the first to ask
    grouped: set = set()
    count = 0
    for m in module.modules():
        if isinstance(m, FusingModule):
            members = m.fusable()
            m.fused = FusedLinears(members, rows_hint) if FusedLinears.usable(members) else None
            if m.fused is not None and not m.keep_members:
                for member in members:
                    member.packed = None  # served by the fused weight
                    grouped.add(id(member))
                count += len(members)
    for m in module.modules():
        if isinstance(m, Linear) and id(m) not in grouped:
            count += m.pack_cpu(rows_hint)
    return count


class GemmaRMSNorm(nn.Module):
    """RMSNorm as Gemma 4 computes it: normalise and scale in float32, then round
    to the input dtype (the weight multiplies directly, no ``1 +``);
    ``with_scale=False`` has no weight (Gemma 4's value norm)."""

    def __init__(self, size: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if hasattr(self, "weight"):
            x32 = x32 * self.weight.float()
        return x32.to(x.dtype)


ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str, what: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP activation of a config's ``hidden_act`` / ``hidden_activation``."""
    if name not in ACTIVATIONS:
        raise CheckpointError(f"{what}: unsupported activation {name!r} ({', '.join(ACTIVATIONS)} are)")
    return ACTIVATIONS[name]


def softcap(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """``tanh(logits / cap) * cap`` (Gemma's final-logit soft-capping), or the logits as they are."""
    if not cap:
        return logits
    return torch.tanh(logits / cap) * cap


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device``. On CUDA the copy goes through pinned
    memory and does not block the host (a pageable copy would wait for the stream
    to drain, which would serialise the engine's round)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def rope_parameters(config: dict) -> dict:
    """The rotary settings of a Hugging Face config (both the ``rope_parameters``
    form and the older ``rope_theta`` / ``rope_scaling`` one)."""
    params = dict(config.get("rope_parameters") or {})
    if "rope_theta" not in params:
        params["rope_theta"] = config.get("rope_theta", 10000.0)
    scaling = config.get("rope_scaling")
    if scaling:
        params.update(scaling)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_inv_freq(head_dim: int, params: dict) -> torch.Tensor:
    """``[head_dim / 2]`` float32 rotary frequencies (default, linear, llama3 and
    proportional, Gemma 4's: only the first ``partial_rotary_factor`` of the
    pairs rotate, at frequencies of the whole head dim; the rest get 0, no
    rotation)."""
    base = float(params.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = params.get("rope_type", "default")
    if kind == "proportional":
        angles = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
        inv_freq = torch.cat([inv_freq[:angles], torch.zeros(head_dim // 2 - angles, device="cpu")])
        inv_freq = inv_freq / float(params.get("factor", 1.0))
    elif kind == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
        original = float(params.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise CheckpointError(f"unsupported rope type {kind!r} (default, linear, llama3 and proportional are)")
    if not bool(torch.isfinite(inv_freq).all()):
        raise CheckpointError(f"the rotary settings {params} give non-finite frequencies for head_dim {head_dim} "
                              "(rope_theta or factor out of range)")
    return inv_freq.float()


# --------------------------------------------------------------- checkpoints


def read_config(folder: PathLike) -> dict:
    """``config.json`` of a model folder as a dict, read strictly (checkpoint.read_config)."""
    from .checkpoint import read_config as read

    return read(folder)


def load_safetensors(folder: PathLike, check_finite: bool = True) -> Dict[str, torch.Tensor]:
    """All tensors of a folder's ``model.safetensors`` (or its shards, via
    ``model.safetensors.index.json``), after checking every header against its
    file (checkpoint.Checkpoint)."""
    from .checkpoint import Checkpoint

    return Checkpoint(folder).load(check_finite=check_finite)


def save_safetensors(tensors: Dict[str, torch.Tensor], folder: PathLike, config: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def load_state(module: nn.Module, tensors: Dict[str, torch.Tensor], what: str,
               sizes: Optional[Dict[str, int]] = None) -> None:
    """Loads exactly the module's parameters and buffers; names what is missing or
    extra, a shape that differs (with the config ``sizes`` it may come from) and
    a tensor of the wrong kind (integers for float weights or the reverse). On a
    meta module with meta tensors it checks the same and allocates nothing."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{what}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected keys {extra[:8]}{'...' if len(extra) > 8 else ''}")
    for name, value in tensors.items():
        want = expected[name]
        if tuple(value.shape) != tuple(want.shape):
            hint = ""
            if sizes:
                named = [f"{k} = {v}" for k, v in sizes.items() if v in tuple(want.shape)]
                shown = named or [f"{k} = {v}" for k, v in sizes.items()]
                hint = f" ({'' if named else 'from '}{', '.join(shown)})"
            raise CheckpointError(f"{what}: key {name} has shape {list(value.shape)}, "
                                  f"the config implies {list(want.shape)}{hint}")
        if value.dtype.is_floating_point != want.dtype.is_floating_point or value.dtype == torch.bool:
            raise CheckpointError(f"{what}: key {name} has dtype {str(value.dtype).replace('torch.', '')}, expected "
                                  f"{'a float' if want.dtype.is_floating_point else 'an integer'} dtype")
    if any(t.is_meta for t in tensors.values()):
        return  # shapes and dtypes checked; nothing to copy
    module.load_state_dict(tensors, strict=True)


# ------------------------------------------------------------------- cache


class CacheFull(RuntimeError):
    """No room in the paged KV cache for a request."""


class PagedKVCache:
    """Keys and values of every layer in pages ``[num_pages, page_size, H_kv, D]``,
    and a block table with one row per request slot.

    Pages are handed out on the host when a request is admitted (for its whole
    budget of tokens) and returned when it leaves; slot mappings and block
    tables are device tensors, so a round needs no host synchronisation."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, max_requests: int, max_pages_per_request: int,
                 layer_shapes: Optional[Sequence[Optional[Tuple[int, int]]]] = None) -> None:
        """``layer_shapes``: per layer ``(kv_heads, head_dim)`` when layers differ
        (Gemma 4's sliding and global layers), ``None`` for a layer that keeps no
        cache of its own (it reads another layer's); ``k`` and ``v`` are then
        lists of per-layer tensors, indexed like the single tensor."""
        if layer_shapes is None:
            shape = (num_layers, num_pages, page_size, kv_heads, head_dim)
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        else:
            def tensor(s):
                size = (num_pages, page_size) + tuple(s) if s is not None else (0, page_size, 1, 1)
                return torch.zeros(size, dtype=dtype, device=device)

            self.k = [tensor(s) for s in layer_shapes]
            self.v = [tensor(s) for s in layer_shapes]
        self.page_size = page_size
        self.max_pages_per_request = max_pages_per_request
        self.block_table = torch.zeros(max_requests, max_pages_per_request, dtype=torch.int32, device=device)
        self.num_pages = num_pages
        self._free: List[int] = list(range(num_pages - 1, -1, -1))
        self._owned: Dict[int, List[int]] = {}

    @property
    def device(self) -> torch.device:
        return self.block_table.device

    def pages_for(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    def could_ever_hold(self, num_tokens: int) -> bool:
        """Whether the request fits once every other request has left."""
        n = self.pages_for(num_tokens)
        return n <= self.max_pages_per_request and n <= self.num_pages

    def can_hold(self, num_tokens: int) -> bool:
        n = self.pages_for(num_tokens)
        return n <= self.max_pages_per_request and n <= len(self._free)

    def allocate(self, slot: int, num_tokens: int) -> None:
        n = self.pages_for(num_tokens)
        if n > self.max_pages_per_request:
            raise CacheFull(f"a request of {num_tokens} tokens needs {n} pages, more than the "
                            f"{self.max_pages_per_request} a request may hold")
        if n > len(self._free):
            raise CacheFull(f"a request of {num_tokens} tokens needs {n} pages, {len(self._free)} are free")
        pages = [self._free.pop() for _ in range(n)]
        self._owned[slot] = pages
        self.block_table[slot] = host_to_device(pages + [0] * (self.max_pages_per_request - n), torch.int32,
                                                self.device)

    def release(self, slot: int) -> None:
        self._free.extend(reversed(self._owned.pop(slot, [])))

    def slots(self, request_slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat cache slots (int64) of tokens at `positions` of the given request slots."""
        pages = self.block_table[request_slots.long(), torch.div(positions, self.page_size, rounding_mode="floor")]
        return pages.long() * self.page_size + positions % self.page_size
