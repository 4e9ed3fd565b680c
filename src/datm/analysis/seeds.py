"""The interval of a Δ measured at several training seeds: what `datm analyze` reports when an arm
has more than one run.

Each seed s gives a paired Δ_s on the same test segments. The reported Δ is their mean, and its 95%
interval is a t interval over the seeds whose standard error also carries the test set's noise:

    Δ̄ ± t(0.975, ν) · sqrt(s² / n + se_seg²)

- s² is the variance of the per-seed Δs: training variance (every seed is scored on the same
  segments, so their spread is the training's, not the test set's);
- se_seg is the standard deviation of Δ̄ under the paired bootstrap of the test segments (one index
  draw shared by every seed, `datm.eval.significance.resample`): the test set's sampling noise,
  which the seeds do not vary;
- ν is Welch–Satterthwaite's degrees of freedom with the bootstrap's variance taken as known:
  ν = (n − 1)(s²/n + se_seg²)² / (s²/n)², rounded down (at least n − 1). Where the seeds disagree,
  the training term dominates and ν ≈ n − 1; where they agree, ν grows and the interval tends to
  the segment bootstrap's normal interval, so a few seeds do not discard what the test set shows.

Why a t interval and not a bootstrap over seeds as well: with the 3–5 seeds a study can afford, a
bootstrap over seeds cannot give a range wider than the seeds themselves (at n = 3 its 95%
interval covers the mean far less often than 95%); the t quantile (4.30 at 3 seeds) pays for
estimating the training variance from so few seeds. With one seed there is no training variance to
estimate and the interval is the segment bootstrap's alone, as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| ≥ |t|) for Student's t with integer `df` degrees of freedom (Abramowitz & Stegun 26.7.3)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + …))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        inside = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # even: sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + …)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        inside = s * total
    return min(1.0, max(0.0, 1.0 - inside))


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided `level` critical value of Student's t (4.303 for df 2 at 95%), by bisection."""
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > 1 - level:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_p(mid, df) > 1 - level else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class SeedInterval:
    """Δ̄ over seeds with its seed-and-segment interval (see the module docstring)."""

    delta: float
    low: float
    high: float
    p_value: float  # two-sided, of the t statistic Δ̄ / se with n − 1 degrees of freedom
    seed_sd: float  # s: the spread of the per-seed Δs
    segment_se: float  # se_seg: the test segments' part of the standard error
    df: int  # ν, the t quantile's degrees of freedom


def seed_interval(per_seed: Sequence[float], segment_samples: np.ndarray) -> SeedInterval:
    """The interval of the mean of `per_seed` Δs (two or more); `segment_samples` are bootstrap
    samples of that mean, the test segments resampled and the seeds held fixed."""
    n = len(per_seed)
    if n < 2:
        raise ValueError("a seed interval needs at least two seeds")
    mean = float(np.mean(per_seed))
    sd = float(np.std(per_seed, ddof=1))
    seg = float(np.std(segment_samples, ddof=1)) if len(segment_samples) > 1 else 0.0
    se = math.sqrt(sd**2 / n + seg**2)
    df = degrees_of_freedom(n, sd, seg)
    half = t_quantile(df) * se
    p = t_two_sided_p(mean / se, df) if se > 0 else (1.0 if mean == 0 else 0.0)
    return SeedInterval(mean, mean - half, mean + half, p, sd, seg, df)


MAX_DF = 1000  # t(0.975, 1000) = 1.962: the normal quantile for every purpose here


def degrees_of_freedom(n: int, seed_sd: float, segment_se: float) -> int:
    """Welch–Satterthwaite's ν for s²/n (n − 1 degrees of freedom) plus a known variance se_seg²."""
    seeds = seed_sd**2 / n
    if seeds == 0:
        return MAX_DF
    return min(MAX_DF, max(n - 1, math.floor((n - 1) * (seeds + segment_se**2) ** 2 / seeds**2)))


__all__ = ["SeedInterval", "degrees_of_freedom", "seed_interval", "t_quantile", "t_two_sided_p"]
