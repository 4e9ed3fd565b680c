"""Paired bootstrap resampling: the one place significance is computed (analyze and report use it).

Each system's per-segment sufficient statistics are computed once (`Statistics`, an adapter over
sacrebleu's metric classes); a resample sums the statistics of the drawn segments and scores the
sum, so resampling never re-tokenises. Draws come from a seeded numpy generator, the same draw as
sacrebleu's `--paired-bs` for the same seed. The metrics themselves are evaluate's
(`datm.evaluate.make_metric`), so a bootstrap scores exactly as `datm evaluate` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from datm.eval.evaluate import EvaluationError, make_metric
from datm.eval.results import BootstrapResult

DEFAULT_SEED = 12345


class Statistics:
    """One metric's per-segment sufficient statistics and the corpus score computed from their sum.

    sacrebleu (checked with 2.6.0) has no public API for sufficient statistics: its own paired
    bootstrap (`sacrebleu.significance`) uses the metric's `_extract_corpus_statistics` and
    `_compute_score_from_stats`. This class is the only place datm calls them.
    """

    def __init__(self, metric: str, tgt_lang: str) -> None:
        self.metric = metric
        self._scorer = make_metric(metric, tgt_lang)

    def segments(self, hyps: Sequence[str], refs: Sequence[str], what: str = "hypotheses") -> np.ndarray:
        """(segments × statistics) for one system."""
        _check_pairing(hyps, refs, what)
        return np.asarray(self._scorer._extract_corpus_statistics(list(hyps), [list(refs)]), dtype=np.float64)

    def score(self, summed: np.ndarray) -> float:
        """The corpus score of summed statistics."""
        return float(self._scorer._compute_score_from_stats(summed).score)


def _check_pairing(hyps: Sequence[str], refs: Sequence[str], what: str) -> None:
    if len(hyps) != len(refs):
        raise EvaluationError(
            f"{len(hyps)} {what} but {len(refs)} references; they must pair up line by line"
        )
    if not refs:
        raise EvaluationError("paired bootstrap needs at least one segment")


def resample(n_segments: int, n_samples: int, seed: int | Sequence[int]) -> np.ndarray:
    """(n_samples × n_segments) segment indices drawn with replacement."""
    return np.random.default_rng(seed).choice(n_segments, size=(n_samples, n_segments), replace=True)


def interval(samples: np.ndarray) -> tuple[float, float]:
    """95% bootstrap interval: drop 1/40 of the sorted samples on each side (as sacrebleu does)."""
    ordered = np.sort(samples)
    cut = len(ordered) // 40
    return float(ordered[cut]), float(ordered[len(ordered) - cut - 1])


@dataclass(frozen=True)
class Paired:
    """Two systems' per-segment statistics on the same references (system a is the reference point)."""

    stats: Statistics
    a: np.ndarray
    b: np.ndarray

    @classmethod
    def of(
        cls, hyps_a: Sequence[str], hyps_b: Sequence[str], refs: Sequence[str], tgt_lang: str, metric: str
    ) -> Paired:
        for hyps, what in ((hyps_a, "hypotheses (system a)"), (hyps_b, "hypotheses (system b)")):
            _check_pairing(hyps, refs, what)  # both checked before any scoring
        stats = Statistics(metric, tgt_lang)
        a = stats.segments(hyps_a, refs, "hypotheses (system a)")
        return cls(stats, a, stats.segments(hyps_b, refs, "hypotheses (system b)"))

    def sampled(self, system: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """The system's corpus score on each resample (one row of `indices` per resample)."""
        return np.array([self.stats.score(system[idx].sum(0)) for idx in indices])

    def delta_samples(self, indices: np.ndarray) -> np.ndarray:
        """score(b) − score(a) on each resample."""
        return self.sampled(self.b, indices) - self.sampled(self.a, indices)

    def bootstrap(self, n_samples: int, seed: int) -> BootstrapResult:
        """Paired bootstrap resampling of b against a (sacrebleu's `--paired-bs`).

        The p-value is sacrebleu's two-sided one: the share of samples whose mean-centred absolute
        difference reaches the observed absolute difference, (count + 1) / (n_samples + 1). The one
        departure: sacrebleu counts samples strictly above the observed difference, so a system
        compared with itself gets p = 1/(n+1); counting ties too gives it p = 1 (no evidence of a
        difference). Whether b is better or worse is the sign of `delta`.
        """
        score_a, score_b = self.stats.score(self.a.sum(0)), self.stats.score(self.b.sum(0))
        indices = resample(len(self.a), n_samples, seed)
        sampled_a, sampled_b = self.sampled(self.a, indices), self.sampled(self.b, indices)
        deltas = sampled_b - sampled_a
        centred = np.abs(deltas) - np.abs(deltas).mean()
        # Tolerance: identical systems give exact zeros, but keep float noise from breaking ties.
        count = int(np.sum(centred >= abs(score_b - score_a) - 1e-9))
        ci_low, ci_high = interval(sampled_b)
        delta_low, delta_high = interval(deltas)
        return BootstrapResult(
            metric=self.stats.metric,
            n_samples=n_samples,
            seed=seed,
            a=score_a,
            b=score_b,
            delta=score_b - score_a,
            mean_b=float(sampled_b.mean()),
            ci_low=ci_low,
            ci_high=ci_high,
            delta_low=delta_low,
            delta_high=delta_high,
            p_value=(count + 1) / (n_samples + 1),
        )


def paired_bootstrap(
    hyps_a: Sequence[str],
    hyps_b: Sequence[str],
    refs: Sequence[str],
    tgt_lang: str,
    metric: str = "bleu",
    n_samples: int = 1000,
    seed: int = DEFAULT_SEED,
) -> BootstrapResult:
    """Paired bootstrap of system b against system a on one test set (see `Paired.bootstrap`)."""
    return Paired.of(hyps_a, hyps_b, refs, tgt_lang, metric).bootstrap(n_samples, seed)


__all__ = ["DEFAULT_SEED", "Paired", "Statistics", "interval", "paired_bootstrap", "resample"]
