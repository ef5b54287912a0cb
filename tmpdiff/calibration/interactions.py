"""A model of a schedule's error refitted on every schedule measured so far: per-step terms and adjacent pairs.

The refinement tries moves in the order a model predicts best. The sensitivities alone (`Sensitivities.score_paired`:
one-step errors from the reference plus the measured interaction of two adjacent cheapest steps) are measured in
one context only, all other steps at the reference, and the error of several cheap steps is far from their sum (on the
text-to-image pipeline's 1 - SSIM, a schedule with two int4 steps among int8 ones scores a third of its additive sum).
So the model starts from those scores and adds, for every step and cheaper level and for every two adjacent steps'
pair of cheaper levels, a correction fitted by ridge regression to what every measured schedule really scored.
The ridge weight is chosen by exact leave-one-out error among a fixed grid, so with few measurements the model stays
at the sensitivities' scores and moves off them only as far as held-out measurements support.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tmpdiff.calibration.search import Problem, Schedule, Sensitivities

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


class InteractionModel:
    """error(s) ~ sum_t a[t, s_t] + sum_t b[t, s_t, s_t+1]; `a`, `b` are the sensitivities' scores plus fitted
    corrections (zero for the reference level, which every score is measured from)."""

    def __init__(self, problem: Problem, sens: Sensitivities) -> None:
        self.levels = problem.all_levels
        self.level_index = problem.rank
        T, L = problem.steps, len(self.levels)
        self.prior_step = np.zeros((T, L))
        for i, p in enumerate(self.levels):
            if p in sens.down:
                self.prior_step[:, i] = sens.down[p].values
        self.prior_pair = np.zeros((max(T - 1, 0), L, L))
        if sens.cheapest in self.level_index:
            c = self.level_index[sens.cheapest]
            for t, interaction in sens.adjacent.items():
                self.prior_pair[t, c, c] = interaction
        self.step, self.pair = self.prior_step.copy(), self.prior_pair.copy()

    def encode(self, schedules: Sequence[Schedule]) -> np.ndarray:
        """Schedules as an (n, T) array of level indices (0 = reference)."""
        return np.array([[self.level_index[p] for p in s] for s in schedules], dtype=np.int64).reshape(
            len(schedules), self.prior_step.shape[0])

    def _score(self, codes: np.ndarray, step: np.ndarray, pair: np.ndarray) -> np.ndarray:
        T = codes.shape[1]
        out = step[np.arange(T), codes].sum(axis=1)
        if T > 1:
            out += pair[np.arange(T - 1), codes[:, :-1], codes[:, 1:]].sum(axis=1)
        return out

    def _features(self, codes: np.ndarray) -> np.ndarray:
        """Indicators of (step, cheaper level) and (adjacent steps, both levels cheaper) for every schedule."""
        T, L = self.prior_step.shape
        n = codes.shape[0]
        step_part = np.zeros((n, T, L))
        step_part[np.arange(n)[:, None], np.arange(T), codes] = 1.0
        pair_part = np.zeros((n, max(T - 1, 0), L, L))
        if T > 1:
            pair_part[np.arange(n)[:, None], np.arange(T - 1), codes[:, :-1], codes[:, 1:]] = 1.0
        # reference terms are not fitted: every measurement is relative to the all-reference schedule
        return np.concatenate([step_part[:, :, 1:].reshape(n, -1), pair_part[:, :, 1:, 1:].reshape(n, -1)], axis=1)

    def fit(self, measured: Mapping[Schedule, float]) -> None:
        """Refit the corrections to every measured schedule's error (ridge weight by leave-one-out error)."""
        schedules = list(measured)
        codes = self.encode(schedules)
        with np.errstate(invalid="ignore"):  # inf - inf
            residual = np.array([measured[s] for s in schedules]) - self._score(codes, self.prior_step, self.prior_pair)
        finite = np.isfinite(residual)  # an infinite error (or prior) says nothing a correction could fit
        if not finite.all():
            codes, residual = codes[finite], residual[finite]
        if residual.size == 0:
            self.step, self.pair = self.prior_step.copy(), self.prior_pair.copy()
            return
        X = self._features(codes)
        U, sv, Vt = np.linalg.svd(X, full_matrices=False)
        Uy = U.T @ residual

        def loo_error(ridge: float) -> float:  # exact leave-one-out mean squared error of the ridge fit
            shrink = sv**2 / (sv**2 + ridge)
            leverage = (U**2) @ shrink
            loo = (residual - U @ (shrink * Uy)) / np.maximum(1.0 - leverage, 1e-9)
            return float(np.mean(loo**2))

        ridge = min(RIDGE_GRID, key=loo_error)
        weights = Vt.T @ (sv / (sv**2 + ridge) * Uy)
        T, L = self.prior_step.shape
        n_step = T * (L - 1)
        self.step = self.prior_step.copy()
        self.step[:, 1:] += weights[:n_step].reshape(T, L - 1)
        self.pair = self.prior_pair.copy()
        if T > 1:
            self.pair[:, 1:, 1:] += weights[n_step:].reshape(T - 1, L - 1, L - 1)

    def predict(self, schedules: Sequence[Schedule]) -> np.ndarray:
        """Predicted error of each schedule."""
        if not schedules:
            return np.zeros(0)
        return self._score(self.encode(schedules), self.step, self.pair)
