"""Bootstrap confidence intervals over samples: a mean, a paired difference of means (absolute or relative to
the second mean), a ratio of means.

Samples are resampled with replacement (percentile intervals, a fixed seed so reports are reproducible).
A paired statistic resamples the same sample indices for both arrays: two schedules are judged on the
same seeds and classes, so their per-sample values are paired.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tmpdiff.formats.errors import TmpdiffError

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def excludes(self, x: float) -> bool:
        """True when x lies outside the interval (e.g. 0 for a difference, 1 for a ratio)."""
        return not self.low <= x <= self.high

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if n < 2:
        raise TmpdiffError(f"a bootstrap interval needs at least 2 samples, got {n}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(value: float, draws: np.ndarray, level: float) -> Interval:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def mean_ci(values, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """The mean of per-sample values and its bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    idx = _indices(len(v), resamples, seed)
    return _interval(v.mean(), v[idx].mean(axis=1), level)


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise TmpdiffError(f"paired samples of different shapes {x.shape} and {y.shape}")
    return x, y


def _resampled_means(x: np.ndarray, y: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays' means over the same resampled indices (paired)."""
    idx = _indices(len(x), resamples, seed)
    return x[idx].mean(axis=1), y[idx].mean(axis=1)


def diff_ci(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """mean(a) - mean(b) over paired samples, with its interval."""
    x, y = _paired(a, b)
    xm, ym = _resampled_means(x, y, resamples, seed)
    return _interval(x.mean() - y.mean(), xm - ym, level)


def relative_diff_ci(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval | None:
    """(mean(a) - mean(b)) / |mean(b)| over paired samples, with its interval (None where mean(b) is 0).

    Each resample divides by its own mean(b): dividing the difference's interval by the full-sample mean instead
    ignores the denominator's spread, and for an error (never below 0) can reach below -100%."""
    x, y = _paired(a, b)
    if y.mean() == 0:
        return None
    xm, ym = _resampled_means(x, y, resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = (xm - ym) / np.abs(ym)
    return _interval((x.mean() - y.mean()) / abs(y.mean()), draws[np.isfinite(draws)], level)


def ratio_ci(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """mean(a) / mean(b) over paired samples, with its interval (NaN where mean(b) is 0)."""
    x, y = _paired(a, b)
    xm, ym = _resampled_means(x, y, resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = xm / ym
        value = x.mean() / y.mean() if y.mean() != 0 else float("nan")
    draws = draws[np.isfinite(draws)]
    if not draws.size:
        return Interval(float(value), float("nan"), float("nan"))
    return _interval(value, draws, level)


def statistic_ci(statistic: Callable[[np.ndarray], float], n: int, resamples: int = 500, level: float = LEVEL,
                 seed: int = 0) -> Interval:
    """Any statistic of a resampled index set (e.g. a Fréchet distance of resampled features)."""
    idx = _indices(n, resamples, seed)
    return _interval(statistic(np.arange(n)), np.array([statistic(i) for i in idx]), level)


def jackknife_values(statistic: Callable[[np.ndarray], float], n: int) -> np.ndarray:
    """The statistic of all n samples, then of each leave-one-out set: n + 1 values.

    Kept apart from the interval so that statistics built from others (a difference of two distances, its ratio to
    one of them) are computed from the same values instead of recomputing each distance per leave-one-out set."""
    if n < 3:
        raise TmpdiffError(f"a jackknife interval needs at least 3 samples, got {n}")
    rows = np.arange(n)
    return np.array([statistic(rows)] + [statistic(np.delete(rows, i)) for i in range(n)], dtype=np.float64)


def jackknife_interval(values: np.ndarray, z: float = 1.96, positive: bool = False) -> Interval:
    """A normal interval from the jackknife standard error of `values` (as `jackknife_values` returns them).

    For biased plug-in statistics such as a Fréchet distance of a few tens of samples, the percentile bootstrap
    is shifted (resampling with duplicates shrinks covariances) and can exclude the estimate itself.
    `positive`: the statistic cannot be negative (a distance, not a difference of two), so the normal interval is
    taken on its logarithm (delta method: se / value) and mapped back; it stays above 0 and is wider above the value
    than below, where a symmetric one would reach below 0 for a distance near 0.
    """
    value, leave_one_out = float(values[0]), np.asarray(values[1:], dtype=np.float64)
    n = len(leave_one_out)
    se = float(np.sqrt((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum()))
    if positive and value > 0:
        with np.errstate(over="ignore"):  # a value ~0 with a spread: the interval is [0, inf)
            spread = float(np.exp(z * se / value))
        return Interval(value, value / spread, value * spread)
    if positive:  # a distance of 0 (a set to itself): nothing below it
        return Interval(0.0, 0.0, z * se)
    return Interval(value, value - z * se, value + z * se)


def jackknife_ci(statistic: Callable[[np.ndarray], float], n: int, z: float = 1.96, positive: bool = False) -> Interval:
    """Statistic of all n samples with a normal interval from the jackknife standard error (`jackknife_interval`)."""
    return jackknife_interval(jackknife_values(statistic, n), z, positive)
