"""Goodness-of-fit helpers for the sampling tests.

Every statistical test in this suite uses Pearson's chi-square at a
false-alarm rate of ALPHA = 1e-6 and is sized so that its power against any
alternative at total-variation distance EPSILON = 0.01 (a 1% bias) is at
least MIN_POWER. For k cells and N samples the noncentrality of an
alternative q against p is N * sum (q - p)^2 / p >= 4 N TV(p, q)^2
(Cauchy-Schwarz on the cells where q > p and where q < p), so the power is at
least that of a noncentral chi-square with lambda = 4 N EPSILON^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps

ALPHA = 1e-6
EPSILON = 0.01
MIN_POWER = 0.99


def power_against_tv(num_samples: int, num_cells: int, epsilon: float = EPSILON, alpha: float = ALPHA) -> float:
    """Lower bound on the chi-square test's power against any TV-epsilon alternative."""
    df = num_cells - 1
    critical = sps.chi2.isf(alpha, df)
    return float(sps.ncx2.sf(critical, df, 4.0 * num_samples * epsilon**2))


def samples_for_power(num_cells: int, power: float = MIN_POWER) -> int:
    """Smallest sample size (to 1%) whose power bound reaches `power`."""
    n = 1000
    while power_against_tv(n, num_cells) < power:
        n = int(n * 1.01) + 1
    return n


@dataclass
class GoodnessOfFit:
    statistic: float
    df: int
    p_value: float
    num_samples: int
    power: float

    def __str__(self) -> str:
        return (
            f"chi2={self.statistic:.1f} df={self.df} p={self.p_value:.3g} "
            f"N={self.num_samples} power(TV={EPSILON})>={self.power:.4f}"
        )


def chi_square(observed_outcomes: torch.Tensor, expected_probs: torch.Tensor) -> GoodnessOfFit:
    """Pearson's chi-square of integer outcomes in [0, K) against probabilities [K].

    Cells with zero expected probability must never be observed (asserted);
    they do not count as degrees of freedom.
    """
    k = expected_probs.numel()
    counts = torch.bincount(observed_outcomes.flatten().cpu(), minlength=k).double().numpy()
    p = expected_probs.double().cpu().numpy()
    impossible = p <= 0
    assert counts[impossible].sum() == 0, "an outcome of probability zero was observed"
    n = counts.sum()
    expected = n * p[~impossible]
    statistic = float((((counts[~impossible] - expected) ** 2) / expected).sum())
    df = int((~impossible).sum()) - 1
    p_value = float(sps.chi2.sf(statistic, df))
    return GoodnessOfFit(statistic, df, p_value, int(n), power_against_tv(int(n), df + 1))


def assert_fits(observed_outcomes: torch.Tensor, expected_probs: torch.Tensor, label: str = "",
                epsilon: float = EPSILON) -> GoodnessOfFit:
    """Asserts the fit, after asserting power >= MIN_POWER against TV = epsilon."""
    fit = chi_square(observed_outcomes, expected_probs)
    power = power_against_tv(fit.num_samples, fit.df + 1, epsilon)
    assert power >= MIN_POWER, f"{label}: test underpowered at TV={epsilon}: power {power:.4f}, {fit}"
    assert fit.p_value > ALPHA, f"{label}: distribution differs from the target: {fit}"
    return fit


def assert_rejects(observed_outcomes: torch.Tensor, expected_probs: torch.Tensor, label: str = "") -> GoodnessOfFit:
    fit = chi_square(observed_outcomes, expected_probs)
    assert fit.p_value <= ALPHA, f"{label}: the test failed to catch a biased sampler: {fit}"
    return fit


def min_expected_ok(expected_probs: torch.Tensor, num_samples: int) -> bool:
    """Chi-square's asymptotics hold when every expected count is >= 5."""
    p = expected_probs[expected_probs > 0]
    return bool((p * num_samples).min() >= 5)


np.seterr(all="ignore")
