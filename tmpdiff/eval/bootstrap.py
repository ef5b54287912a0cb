"""Bootstrap confidence intervals over samples: a mean, a paired difference of means (absolute or relative to
the second mean), a ratio of means.

Samples are resampled with replacement (percentile intervals, a fixed seed so reports are reproducible).
A paired statistic resamples the same sample indices for both arrays: two schedules are judged on the
same seeds and classes, so their per-sample values are paired.

`clusters` (one id per sample, optional): samples of one cluster are not independent, e.g. a text-to-image
pipeline's samples are prompts x seeds and the errors of one prompt under its seeds correlate. The bootstrap then
resamples clusters with replacement and keeps each drawn cluster's samples together (the resampled mean is over all
their samples, so clusters of different sizes weigh by their size), paired across the compared arrays. Without
clusters, samples are resampled one by one: right for the class-conditional tables, whose classes are a fixed
stratum present in every set and whose samples of one class have independent noise.
"""

from __future__ import annotations

import math
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
        """True when x lies outside the interval (e.g. 0 for a difference, 1 for a ratio); an interval that could not
        be formed (NaN ends) excludes nothing."""
        if math.isnan(self.low) or math.isnan(self.high):
            return False
        return not self.low <= x <= self.high

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if n < 2:
        raise TmpdiffError(f"a bootstrap interval needs at least 2 samples, got {n}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _cluster_ids(clusters, n: int) -> np.ndarray:
    """Cluster ids as 0..k-1 per sample; at least 2 clusters."""
    ids = np.unique(np.asarray(clusters), return_inverse=True)[1].reshape(-1)
    if len(ids) != n:
        raise TmpdiffError(f"{len(ids)} cluster ids for {n} samples")
    if ids.max(initial=-1) + 1 < 2:
        raise TmpdiffError(f"a clustered bootstrap interval needs at least 2 clusters, got {ids.max(initial=-1) + 1}")
    return ids


def bootstrap_weights(n: int, resamples: int = RESAMPLES, seed: int = 0, clusters=None) -> np.ndarray:
    """(resamples, n) weights: how often each sample is in each resample. Without `clusters` the resamples are
    those of the unclustered intervals (same seed, same draws); with them, every sample of a cluster drawn m times
    weighs m. A resampled mean is `weights @ values / weights.sum(axis=1)`."""
    if clusters is None:
        idx = _indices(n, resamples, seed)
        return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)
    ids = _cluster_ids(clusters, n)
    k = int(ids.max()) + 1
    drawn = np.random.default_rng(seed).integers(0, k, size=(resamples, k))
    counts = np.stack([np.bincount(row, minlength=k) for row in drawn]).astype(np.float64)
    return counts[:, ids]


def _weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per resample (rows of `weights`), the weighted mean of `values` (n,) or of each row of `values` (m, n)."""
    return (values @ weights.T) / weights.sum(axis=1)


def _interval(value: float, draws: np.ndarray, level: float) -> Interval:
    tail = (1 - level) / 2 * 100
    if np.isinf(draws).any():  # resamples dividing by 0: an end among them is unbounded (interpolating gives NaN)
        low, high = np.percentile(draws, [tail, 100 - tail], method="nearest")
    else:
        low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def _quotients(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    """Per-resample quotients; a resample dividing a non-zero numerator by 0 is +-inf and kept (it widens the interval
    to unbounded where there are enough of them), 0 / 0 says nothing and is dropped."""
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = numerators / denominators
    return draws[~np.isnan(draws)]


def mean_ci(values, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0, clusters=None) -> Interval:
    """The mean of per-sample values and its bootstrap interval (`clusters`: resample clusters of samples)."""
    v = np.asarray(values, dtype=np.float64)
    if clusters is not None:
        return _interval(v.mean(), _weighted_means(v, bootstrap_weights(len(v), resamples, seed, clusters)), level)
    idx = _indices(len(v), resamples, seed)
    return _interval(v.mean(), v[idx].mean(axis=1), level)


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise TmpdiffError(f"paired samples of different shapes {x.shape} and {y.shape}")
    return x, y


def _resampled_means(x: np.ndarray, y: np.ndarray, resamples: int, seed: int, clusters=None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays' means over the same resampled indices, or the same resampled clusters (paired)."""
    if clusters is not None:
        weights = bootstrap_weights(len(x), resamples, seed, clusters)
        return _weighted_means(x, weights), _weighted_means(y, weights)
    idx = _indices(len(x), resamples, seed)
    return x[idx].mean(axis=1), y[idx].mean(axis=1)


def diff_ci(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0, clusters=None) -> Interval:
    """mean(a) - mean(b) over paired samples, with its interval (`clusters`: resample clusters of samples)."""
    x, y = _paired(a, b)
    xm, ym = _resampled_means(x, y, resamples, seed, clusters)
    return _interval(x.mean() - y.mean(), xm - ym, level)


def relative_diff_ci(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0, clusters=None) -> Interval | None:
    """(mean(a) - mean(b)) / |mean(b)| over paired samples, with its interval (None where mean(b) is 0).

    Each resample divides by its own mean(b): dividing the difference's interval by the full-sample mean instead
    ignores the denominator's spread, and for an error (never below 0) can reach below -100%."""
    x, y = _paired(a, b)
    if y.mean() == 0:
        return None
    xm, ym = _resampled_means(x, y, resamples, seed, clusters)
    return _interval((x.mean() - y.mean()) / abs(y.mean()), _quotients(xm - ym, np.abs(ym)), level)


def ratio_ci(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0, clusters=None) -> Interval:
    """mean(a) / mean(b) over paired samples, with its interval (NaN where mean(b) is 0)."""
    x, y = _paired(a, b)
    xm, ym = _resampled_means(x, y, resamples, seed, clusters)
    value = x.mean() / y.mean() if y.mean() != 0 else float("nan")
    draws = _quotients(xm, ym)
    if not np.isfinite(value) or not draws.size:
        return Interval(float(value), float("nan"), float("nan"))
    return _interval(value, draws, level)


def min_mean_draws(candidates, weights: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Per resample (rows of `weights`, from `bootstrap_weights`), the least resampled mean among the rows of
    `candidates` (m, n): the best of m choices re-selected on each resample. Matrix products over chunks of rows."""
    c = np.asarray(candidates, dtype=np.float64)
    best = np.full(len(weights), np.inf)
    for start in range(0, len(c), chunk):
        np.minimum(best, _weighted_means(c[start:start + chunk], weights).min(axis=0), out=best)
    return best


def ratio_to_best_ci(a, candidates, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0, clusters=None,
                     best_draws: np.ndarray | None = None) -> Interval:
    """mean(a) / min over the rows of `candidates` (m, n) of their means, over paired samples, with its interval.

    The value is the ratio to the best candidate of these samples; each resample re-selects the best candidate on
    its own resampled means, so the interval carries the selection's variability (with the best held fixed, a
    resample where another candidate does better puts a ratio below 1 that no choice could reach). With `a` among the
    candidates no ratio falls below 1. `best_draws`: `min_mean_draws` of the candidates, computed once for several
    `a` (it must come from the weights of the same `resamples`, `seed` and `clusters`)."""
    x = np.asarray(a, dtype=np.float64)
    c = np.asarray(candidates, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != len(x):
        raise TmpdiffError(f"candidates of shape {c.shape} for {len(x)} samples")
    weights = bootstrap_weights(len(x), resamples, seed, clusters)
    if best_draws is None:
        best_draws = min_mean_draws(c, weights)
    best = c.mean(axis=1).min()
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = _weighted_means(x, weights) / best_draws
        value = x.mean() / best if best != 0 else float("nan")
    draws = draws[np.isfinite(draws)]
    if not draws.size:
        return Interval(float(value), float("nan"), float("nan"))
    return _interval(value, draws, level)


def statistic_ci(statistic: Callable[[np.ndarray], float], n: int, resamples: int = 500, level: float = LEVEL,
                 seed: int = 0) -> Interval:
    """Any statistic of a resampled index set (e.g. a Fréchet distance of resampled features)."""
    idx = _indices(n, resamples, seed)
    return _interval(statistic(np.arange(n)), np.array([statistic(i) for i in idx]), level)


def jackknife_values(statistic: Callable[[np.ndarray], float], n: int, clusters=None) -> np.ndarray:
    """The statistic of all n samples, then of each leave-one-out set: n + 1 values. With `clusters` (one id per
    sample) each set leaves out one whole cluster (the delete-a-group jackknife: g + 1 values for g clusters), as the
    bootstrap resamples them: a text-to-image prompt's samples under its seeds are not independent.

    Kept apart from the interval so that statistics built from others (a difference of two distances, its ratio to
    one of them) are computed from the same values instead of recomputing each distance per leave-one-out set."""
    rows = np.arange(n)
    if clusters is None:
        groups = [np.array([i]) for i in rows]
    else:
        ids = _cluster_ids(clusters, n)
        groups = [np.flatnonzero(ids == g) for g in range(ids.max() + 1)]
    if len(groups) < 3:
        what = "samples" if clusters is None else "clusters"
        raise TmpdiffError(f"a jackknife interval needs at least 3 {what}, got {len(groups)}")
    return np.array([statistic(rows)] + [statistic(np.delete(rows, g)) for g in groups], dtype=np.float64)


def jackknife_interval(values: np.ndarray, z: float = 1.96, positive: bool = False) -> Interval:
    """A normal interval from the jackknife standard error of `values` (as `jackknife_values` returns them; for
    clusters, the delete-a-group form, exact for clusters of equal size).

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
