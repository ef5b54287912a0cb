"""Multiple-choice knapsack, solved exactly on the given costs as a mixed-integer program (HiGHS via scipy).

Each step t picks one level p with cost c[t][p] and score s[t][p]; minimise the summed score subject to
the summed cost staying within the budget. A score of +inf means the option is not offered at that step (a level
whose measured error there was not finite, `search.Problem.error`): it is never picked.
Costs are used as given: nothing is rounded or discretised.
The cost row is sum(cost) <= budget * (1 + 1e-9): the tiny relative tolerance keeps a schedule that
costs exactly the budget feasible despite float rounding in the sums.

Formulation. Steps are grouped by identical cost rows (in calibration every step has the same per-level
costs, so there is one group). A step alone in its group gets binary x[t, p], one per option, with
sum_p x[t, p] = 1. A group g of several steps gets integer counts n[g, p] (how many of its steps take
level p), continuous 0 <= x[t, p] <= 1 with sum_p x[t, p] = 1 and sum_{t in g} x[t, p] = n[g, p]; its
cost enters the cost row as sum_p c[g, p] n[g, p]. For integer counts the x-part is a transportation
problem (totally unimodular), so this has the same optimum as binary x everywhere, but branch and
bound only branches on the counts. (Binary x for T identical-cost steps is hopeless for HiGHS: the
many equivalent ways to fill the budget left a T=1000, 4-level instance 1e-4 from optimal after 30 s;
this formulation proves it optimal in 0.3 s.) The levels a group's steps take are then assigned
exactly for the chosen counts with `scipy.optimize.linear_sum_assignment`.

"Exact" means: `scipy.optimize.milp` is run with the relative optimality gap set to 0, so it stops
only when its lower bound meets the incumbent. HiGHS keeps its absolute gap of 1e-6, so scores are
shifted per step (which does not change the argmin, one option is taken per step) and scaled so the
largest per-step spread is 1e6: the absolute gap is then at most 1e-12 of that spread. Every answer is
re-checked in exact float sums against the budget.

Time per solve, measured on the 2-core machine while other jobs ran (load average ~6), median (max)
of 6 score profiles (noisy and piecewise-linear), budgets for 1.1x-1.3x:
  equal per-level costs at every step (calibration's case):
    T=20:   L=2 5 (11) ms,   L=4 15 (25) ms,   L=7 40 (56) ms
    T=100:  L=2 15 (20) ms,  L=4 41 (68) ms,   L=7 0.14 (0.23) s
    T=1000: L=2 54 (72) ms,  L=4 0.44 (0.57) s, L=7 1.7 (4.1) s
  a different random cost row at every step (3 budgets): T=100 L=7 0.38 (0.63) s, T=1000 L=2/4/7
  0.8/1.3/1.6 (1.0/1.9/1.8) s. The first solve in a process also imports scipy.optimize (~0.5 s).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from tmpdiff.formats.errors import TmpdiffError

BUDGET_TOLERANCE = 1e-9  # relative: a schedule costing exactly the budget stays feasible


def within_budget(cost: float, budget: float) -> bool:
    """Whether `cost` fits `budget` with the relative tolerance: a sum of per-step costs meant to equal the budget (K
    cheap steps at the budget of K, all-cheapest at the top speedup) can land one float rounding step over it."""
    return cost <= budget * (1 + BUDGET_TOLERANCE)
_SCORE_SPAN = 1e6  # largest per-step score spread after scaling (HiGHS's absolute gap is 1e-6)


def solve_mckp(costs: Sequence[Sequence[float]], scores: Sequence[Sequence[float]], budget: float) -> list[int]:
    """Index of the chosen option per step, minimising sum(scores) with sum(costs) <= budget (exactly)."""
    steps = len(costs)
    if steps == 0:
        return []
    if budget <= 0:
        raise TmpdiffError(f"cost budget must be positive, got {budget}")
    c = np.asarray(costs, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if c.ndim != 2 or c.shape != s.shape or c.shape[1] == 0:
        raise TmpdiffError(f"knapsack needs one cost and one score per step and option, got costs {c.shape}, scores {s.shape}")
    if not np.isfinite(c).all():
        raise TmpdiffError("knapsack costs must be finite")
    if np.isnan(s).any() or np.isneginf(s).any():
        t, p = np.argwhere(np.isnan(s) | np.isneginf(s))[0]
        raise TmpdiffError(f"knapsack score of step {t}, option {p} is {s[t, p]} (scores must be finite, or +inf for "
                           "an option not offered)")
    offered = np.isfinite(s)
    bare = np.flatnonzero(~offered.any(axis=1))
    if bare.size:
        raise TmpdiffError(f"step {int(bare[0])} has no option offered (every score is +inf)")
    limit = budget * (1 + BUDGET_TOLERANCE)
    if _cost(c, np.where(offered, c, np.inf).argmin(axis=1)) > limit:
        raise TmpdiffError("no schedule fits the cost budget (even the cheapest level at every step costs more)")

    # The unconstrained optimum (cheapest among equal scores) is the answer when it fits.
    free = np.lexsort((c, s), axis=1)[:, 0]
    if _cost(c, free) <= limit:
        return [int(i) for i in free]

    shifted = np.where(offered, s - np.where(offered, s, np.inf).min(axis=1, keepdims=True), 0.0)
    objective = shifted * (_SCORE_SPAN / float(shifted.max()))  # max > 0, or `free` would have fitted
    objective[~offered] = np.inf  # kept out by the bounds in `_solve`
    rhs, excess = limit, 0.0
    for _ in range(4):
        picks = _solve(c, objective, rhs)
        excess = _cost(c, picks) - limit
        if excess <= 0:
            return [int(i) for i in picks]
        rhs -= excess  # HiGHS's feasibility tolerance let a choice slip over: tighten and solve again
    raise TmpdiffError(f"knapsack solver returned choices over budget (by {excess:.3g}) four times")


def _cost(c: np.ndarray, picks: np.ndarray) -> float:
    return float(sum(float(c[t, i]) for t, i in enumerate(picks)))


def _solve(c: np.ndarray, objective: np.ndarray, rhs: float) -> np.ndarray:
    from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp
    from scipy.sparse import coo_array

    steps, options = c.shape
    groups: dict[bytes, list[int]] = {}
    for t in range(steps):
        groups.setdefault(c[t].tobytes(), []).append(t)
    shared = [g for g in groups.values() if len(g) > 1]
    single = [g[0] for g in groups.values() if len(g) == 1]

    nx = steps * options  # x[t, p] at t * options + p, then the counts n[g, p]
    n_vars = nx + len(shared) * options
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []

    def add(row: int, col: int, value: float) -> None:
        rows.append(row)
        cols.append(col)
        vals.append(value)

    for t in range(steps):  # one option per step
        for p in range(options):
            add(t, t * options + p, 1.0)
    cost_row = steps + len(shared) * options
    for k, group in enumerate(shared):  # counts of a shared group; its cost
        for p in range(options):
            row, n_col = steps + k * options + p, nx + k * options + p
            for t in group:
                add(row, t * options + p, 1.0)
            add(row, n_col, -1.0)
            add(cost_row, n_col, float(c[group[0], p]))
    for t in single:
        for p in range(options):
            add(cost_row, t * options + p, float(c[t, p]))
    matrix = coo_array((vals, (rows, cols)), shape=(cost_row + 1, n_vars)).tocsr()
    lower = np.r_[np.ones(steps), np.zeros(len(shared) * options), -np.inf]
    upper = np.r_[np.ones(steps), np.zeros(len(shared) * options), rhs]
    integrality = np.zeros(n_vars)
    for t in single:
        integrality[t * options : (t + 1) * options] = 1
    integrality[nx:] = 1
    offered = np.isfinite(objective)
    upper_bounds = np.r_[offered.reshape(nx).astype(np.float64), np.repeat([float(len(g)) for g in shared], options)]
    cost_vector = np.r_[np.where(offered, objective, 0.0).reshape(nx), np.zeros(n_vars - nx)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = milp(cost_vector, integrality=integrality, bounds=Bounds(0, upper_bounds),
                      constraints=LinearConstraint(matrix, lower, upper),
                      # HiGHS's presolve only slows the pure count model down (10x for T=1000, two levels)
                      options={"mip_rel_gap": 0.0, "presolve": bool(single)})
    if result.status != 0 or result.x is None:
        raise TmpdiffError(f"knapsack solver failed: {result.message}")
    picks = result.x[:nx].reshape(steps, options).argmax(axis=1)
    for k, group in enumerate(shared):
        counts = np.rint(result.x[nx + k * options : nx + (k + 1) * options]).astype(np.int64)
        if counts.sum() != len(group) or (counts < 0).any():
            raise TmpdiffError(f"knapsack solver returned level counts {counts.tolist()} for {len(group)} steps")
        # the best assignment of the group's steps to exactly these counts per level
        slots = np.repeat(np.arange(options), counts)
        rows_idx, slot_idx = linear_sum_assignment(objective[np.ix_(group, slots)])
        picks[np.asarray(group)[rows_idx]] = slots[slot_idx]
    return picks
