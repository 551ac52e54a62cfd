"""``python -m dspark bench linear``: the models' CPU linear products side by
side, dspark's (:func:`dspark.ops.linear`), oneDNN's on packed weights and
torch's (BLAS), in float32 and with bfloat16 weights.

The products are those of SmolLM2-135M-Instruct's 30 layers as the engine
runs them (q / k / v as one 960 x 576 weight, o 576 x 576, gate / up as one
3072 x 576, down 576 x 1536), random weights (the time does not depend on
the values), every layer's its own (425 MB in float32: read from memory, as
in a forward). Each product follows a small torch op on its input, as in a
forward (``models.common.products_pass``). For 1, 4, 8 and 64 rows (a
decoding step, verifications at batch 1, a prefill), the backends' passes over all
layers are interleaved over the repeats so that a drift of the machine moves
every entry alike; printed: the median per pass with its relative spread and
the ratio of time to oneDNN's float32 (BLAS's where oneDNN cannot pack).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

from .models.common import (DsparkWeight, PackedWeight, _bfloat16_packing_supported, _packing_available,
                            products_pass)

SMOLLM2_LAYER = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (N, K) of one layer's products
SMOLLM2_LAYERS = 30


def linear_benchmark(quick: bool = False, rows: Sequence[int] = (1, 4, 8, 64), repeats: int = 7) -> dict:
    layers = 4 if quick else SMOLLM2_LAYERS
    if quick:
        rows, repeats = (1, 4, 8), 3
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(layers) for n, k in SMOLLM2_LAYER]
    halves = [w.to(torch.bfloat16) for w in weights]
    products: Dict[str, List[Callable[[torch.Tensor], torch.Tensor]]] = {
        "float32, BLAS": [lambda x, w=w: F.linear(x, w) for w in weights],
        "float32, dspark": [lambda x, d=DsparkWeight(w): d(x, None) for w in weights],
        "bfloat16, torch": [lambda x, w=w: F.linear(x, w) for w in halves],
        "bfloat16, dspark": [lambda x, d=DsparkWeight(w): d(x, None) for w in halves]}
    if _packing_available():
        products["float32, oneDNN packed"] = [lambda x, p=PackedWeight(w): p(x, None) for w in weights]
        if _bfloat16_packing_supported():
            products["bfloat16, oneDNN packed"] = [lambda x, p=PackedWeight(w): p(x, None) for w in halves]
    baseline = "float32, oneDNN packed" if "float32, oneDNN packed" in products else "float32, BLAS"
    out: Dict[str, object] = {"layers": layers, "repeats": repeats, "baseline": baseline, "rows": []}
    with torch.inference_mode():
        for m in rows:
            inputs = {dtype: {k: torch.randn(m, k, generator=gen).to(dtype) for _, k in SMOLLM2_LAYER}
                      for dtype in (torch.float32, torch.bfloat16)}

            passes = {name: products_pass(fns, weights,
                                          [inputs[torch.float32 if name.startswith("float32") else torch.bfloat16]])
                      for name, fns in products.items()}
            for go in passes.values():  # warm-up
                go()
            times: Dict[str, List[float]] = {name: [] for name in passes}
            for _ in range(repeats):
                for name, go in passes.items():
                    t0 = time.perf_counter()
                    go()
                    times[name].append(time.perf_counter() - t0)
            base = times[baseline]
            for name, ts in times.items():
                ratios = [t / b for t, b in zip(ts, base)]
                median = statistics.median(ts)
                out["rows"].append(dict(rows=m, product=name, ms=median * 1e3,  # type: ignore[union-attr]
                                        spread=(max(ts) - min(ts)) / median, ratio=statistics.median(ratios),
                                        ratio_low=min(ratios), ratio_high=max(ratios)))
    return out


def print_linear(result: dict) -> None:
    from . import cpu_isa

    print(f"CPU linear products of SmolLM2-135M's {result['layers']} layers (q/k/v, o, gate/up, down; every "
          f"layer's weights its own), each after a small torch op; CPU ISA {cpu_isa()}; median ms per pass over "
          f"{result['repeats']} interleaved repeats (spread: max - min over median); x: time against "
          f"{result['baseline']} in the same repeat (median, range)")
    header = f"{'rows':>4}  {'product':26} {'ms':>9} {'spread':>7} {'x':>7} {'range':>13}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(f"{r['rows']:4d}  {r['product']:26} {r['ms']:9.2f} {r['spread']:7.0%} {r['ratio']:7.3f} "
              f"{r['ratio_low']:6.2f}-{r['ratio_high']:.2f}")
