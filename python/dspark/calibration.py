"""Sequential Temperature Scaling of the confidence head (DSPARK.md, section 2).

Raw confidences are over-confident. STS fits one temperature per position,
left to right, so that the cumulative products ``a_k = prod_{i<=k} c_i`` match
the observed frequency with which the first ``k`` drafts were all accepted:
``c_k' = sigmoid(logit(c_k) / t_k)``, ``t_k`` chosen on a grid to minimise the
expected calibration error (20 equal-width bins) of ``a_k'`` with ``t_1..t_{k-1}``
fixed. Temperatures are positive, so the map is order-preserving.

A position with fewer than ``min_trials`` held-out rounds that verified it
(late positions of a weak drafter are rarely reached) is not fitted: a grid
search on a handful of outcomes runs to the edge of the grid. It takes its
left neighbour's temperature (1 at the first position), which keeps the
cumulative product as the fitted positions shape it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

__all__ = ["CalibrationRecorder", "STS", "auc", "brier", "ece", "fit_sts", "metrics"]

STS_FILENAME = "sts.json"
MIN_TRIALS = 50  # held-out rounds a position needs to get a temperature of its own
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
DEFAULT_GRID = torch.exp(torch.linspace(torch.log(torch.tensor(0.05)), torch.log(torch.tensor(20.0)), 400))


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 20) -> float:
    """Expected calibration error with ``bins`` equal-width bins on [0, 1]."""
    probs, labels = probs.double().flatten(), labels.double().flatten()
    if probs.numel() == 0:
        return 0.0
    index = torch.clamp((probs * bins).long(), max=bins - 1)
    conf_sum = torch.bincount(index, weights=probs, minlength=bins)
    label_sum = torch.bincount(index, weights=labels, minlength=bins)
    return float((conf_sum - label_sum).abs().sum() / probs.numel())


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count one half); NaN when
    only one class is present."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    unique, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    mean_rank = (first + first + counts - 1).double() / 2
    ranks[order] = mean_rank[inverse]
    rank_sum = float(ranks[labels].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    probs, labels = probs.double().flatten(), labels.double().flatten()
    return float(((probs - labels) ** 2).mean()) if probs.numel() else 0.0


@dataclass
class STS:
    """Per-position temperatures ``t_1..t_gamma``."""

    temperatures: List[float]

    def __post_init__(self) -> None:
        if any(not t > 0 for t in self.temperatures):
            raise ValueError(f"STS: temperatures must be > 0, got {self.temperatures}")

    @property
    def gamma(self) -> int:
        return len(self.temperatures)

    def tensor(self, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        return torch.tensor(self.temperatures, dtype=torch.float32, device=device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated conditional confidences from raw logits ``[..., gamma]``."""
        t = self.tensor(logits.device)[: logits.shape[-1]]
        return torch.sigmoid(logits.float() / t)

    def survival(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(self.apply(logits), dim=-1)

    def save(self, path: Union[str, Path]) -> Path:
        """Writes ``sts.json`` (into ``path`` if it is a directory, e.g. a drafter's)."""
        path = Path(path)
        if path.is_dir():
            path = path / STS_FILENAME
        path.write_text(json.dumps({"method": "sequential temperature scaling", "temperatures": self.temperatures}))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "STS":
        """Reads ``sts.json`` (from ``path`` or the directory ``path``). A file that
        is not a JSON object with ``temperatures``, a non-empty list of positive
        finite float32 numbers, is a ``dspark.models.CheckpointError``."""
        from .models.checkpoint import CheckpointError, read_json_object

        path = Path(path)
        if path.is_dir():
            path = path / STS_FILENAME
        temperatures = read_json_object(path, STS_FILENAME).get("temperatures")
        if (not isinstance(temperatures, list) or not temperatures
                or any(isinstance(t, bool) or not isinstance(t, (int, float)) for t in temperatures)
                or not all(0.0 < float(t) <= _FLOAT32_MAX for t in temperatures)):
            shown = repr(temperatures)
            raise CheckpointError(f"{path}: field 'temperatures' must be a non-empty list of positive finite numbers, "
                                  f"got {shown if len(shown) <= 80 else shown[:77] + '...'}")
        return cls([float(t) for t in temperatures])


def _logit(c: torch.Tensor) -> torch.Tensor:
    c = c.double().clamp(1e-12, 1 - 1e-12)
    return torch.log(c) - torch.log1p(-c)


def metrics(survival: torch.Tensor, accepted: torch.Tensor, observed: torch.Tensor,
            bins: int = 20) -> List[Dict[str, float]]:
    """Per position: ECE, AUC and Brier of ``survival[:, k]`` against ``accepted[:, k]``
    over the observed rows, and how many there were."""
    out = []
    for k in range(survival.shape[1]):
        mask = observed[:, k].bool()
        p, y = survival[mask, k], accepted[mask, k]
        out.append({"position": k + 1, "count": int(mask.sum()), "ece": ece(p, y, bins),
                    "auc": auc(p, y), "brier": brier(p, y)})
    return out


def fit_sts(
    logits: torch.Tensor,
    accepted: torch.Tensor,
    observed: Optional[torch.Tensor] = None,
    *,
    grid: Optional[torch.Tensor] = None,
    bins: int = 20,
    min_trials: int = MIN_TRIALS,
) -> Tuple[STS, Dict[str, List[Dict[str, float]]]]:
    """Fits STS temperatures left to right by grid search.

    A position observed in fewer than ``min_trials`` rounds takes the
    temperature of the position before it (1.0 for the first); the report's
    ``"fallback"`` lists those positions (1-based).

    Args:
        logits: ``[N, gamma]`` raw confidence logits of N recorded rounds.
        accepted: ``[N, gamma]`` bool, whether drafts ``1..k`` were all accepted.
        observed: ``[N, gamma]`` bool, whether position k was verified in that round
            (default: all).
    Returns the temperatures and a report ``{"before": [...], "after": [...]}`` of
    per-position metrics (see :func:`metrics`).
    """
    if logits.shape != accepted.shape or logits.dim() != 2:
        raise ValueError(f"fit_sts: logits and accepted must both be [N, gamma], got "
                         f"{list(logits.shape)} and {list(accepted.shape)}")
    logits = logits.detach().double().cpu()
    accepted = accepted.detach().bool().cpu()
    observed = torch.ones_like(accepted) if observed is None else observed.detach().bool().cpu()
    grid = (DEFAULT_GRID if grid is None else grid).double()
    gamma = logits.shape[1]
    temperatures: List[float] = []
    fallback: List[int] = []
    prefix = torch.ones(logits.shape[0], dtype=torch.float64)
    for k in range(gamma):
        mask = observed[:, k]
        if int(mask.sum()) < min_trials:  # too few outcomes to fit: the neighbour's temperature
            t = temperatures[-1] if temperatures else 1.0
            temperatures.append(t)
            fallback.append(k + 1)
            prefix = prefix * torch.sigmoid(logits[:, k] / t)
            continue
        y = accepted[mask, k]
        candidates = prefix[mask].unsqueeze(0) * torch.sigmoid(logits[mask, k].unsqueeze(0) / grid.unsqueeze(1))
        errors = torch.tensor([ece(row, y, bins) for row in candidates]) if mask.any() else torch.zeros(grid.numel())
        # ties: the temperature closest to 1
        best_error = errors.min()
        near = torch.nonzero(errors <= best_error + 1e-15).flatten()
        choice = near[torch.argmin((torch.log(grid[near])).abs())]
        t = float(grid[choice])
        temperatures.append(t)
        prefix = prefix * torch.sigmoid(logits[:, k] / t)
    sts = STS(temperatures)
    raw = torch.cumprod(torch.sigmoid(logits), dim=-1)
    report = {"before": metrics(raw, accepted, observed, bins),
              "after": metrics(sts.survival(logits.float()).double(), accepted, observed, bins),
              "fallback": fallback}
    return sts, report


class CalibrationRecorder:
    """Collects what STS needs from the engine's rounds, without synchronising:
    the raw confidence logits ``[R, gamma]``, the verified lengths ``[R]`` and
    ``num_accepted`` ``[R]`` (rejection_sample's output). Position ``k`` of a round
    is observed when it was verified (``k <= length``); it counts as accepted when
    the first ``k`` drafts all were."""

    def __init__(self, max_rounds: Optional[int] = None) -> None:
        self.max_rounds = max_rounds
        self._rounds: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return sum(r[0].shape[0] for r in self._rounds)

    def record(self, logits: torch.Tensor, lengths: torch.Tensor, num_accepted: torch.Tensor) -> None:
        if logits.dim() != 2 or lengths.shape != (logits.shape[0],) or num_accepted.shape != (logits.shape[0],):
            raise ValueError("CalibrationRecorder.record: expected logits [R, gamma], lengths [R], num_accepted [R]")
        self._rounds.append((logits.detach(), lengths.detach(), num_accepted.detach()))
        if self.max_rounds is not None and len(self._rounds) > self.max_rounds:
            self._rounds.pop(0)

    def data(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, accepted, observed)``, each ``[N, gamma]`` on the CPU."""
        if not self._rounds:
            raise ValueError("CalibrationRecorder: nothing recorded")
        logits = torch.cat([r[0].float().cpu() for r in self._rounds])
        lengths = torch.cat([r[1].long().cpu() for r in self._rounds])
        accepted_count = torch.cat([r[2].long().cpu() for r in self._rounds])
        positions = torch.arange(1, logits.shape[1] + 1).unsqueeze(0)
        observed = positions <= lengths.unsqueeze(1)
        accepted = positions <= accepted_count.unsqueeze(1)
        return logits, accepted, observed

    def fit(self, **kwargs) -> Tuple[STS, Dict[str, List[Dict[str, float]]]]:
        logits, accepted, observed = self.data()
        return fit_sts(logits, accepted, observed, **kwargs)
