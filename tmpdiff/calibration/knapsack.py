"""Exact multiple-choice knapsack by dynamic programming over discretised cost.

Each step t picks one level p with cost c[t][p] and score s[t][p]; minimise the summed score subject to
the summed cost staying within the budget. Costs are rounded down to units of budget/resolution
(rounding up would make a schedule that costs exactly the budget infeasible and push the
search one cheap step too far); a choice over budget in exact costs is re-solved with a smaller
discrete capacity, so every returned choice is feasible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tmpdiff.formats.errors import TmpdiffError


def solve_mckp(costs: Sequence[Sequence[float]], scores: Sequence[Sequence[float]], budget: float,
               resolution: int = 2000) -> list[int]:
    """Index of the chosen option per step, minimising sum(scores) with sum(costs) <= budget."""
    steps = len(costs)
    if steps == 0:
        return []
    if budget <= 0:
        raise TmpdiffError(f"cost budget must be positive, got {budget}")
    unit = budget / resolution
    int_costs = [[int(c // unit) for c in row] for row in costs]
    capacity = resolution
    while capacity >= 0:
        picks = _solve(int_costs, scores, capacity)
        if picks is None:
            break
        if sum(costs[t][i] for t, i in enumerate(picks)) <= budget * (1 + 1e-9):
            return picks
        capacity -= 1
    raise TmpdiffError("no schedule fits the cost budget (even the cheapest level at every step costs more)")


def _solve(int_costs: list[list[int]], scores: Sequence[Sequence[float]], capacity: int) -> list[int] | None:
    steps = len(int_costs)
    if sum(min(row) for row in int_costs) > capacity:
        return None
    inf = float("inf")
    best = np.full(capacity + 1, inf)
    best[0] = 0.0
    choice = np.full((steps, capacity + 1), -1, dtype=np.int32)
    for t in range(steps):
        nxt = np.full(capacity + 1, inf)
        for option, (c, s) in enumerate(zip(int_costs[t], scores[t], strict=True)):
            if c > capacity:
                continue
            shifted = np.full(capacity + 1, inf)
            shifted[c:] = best[: capacity + 1 - c] + s
            better = shifted < nxt
            nxt[better] = shifted[better]
            choice[t][better] = option
        best = nxt
    end = int(np.argmin(best))
    picks = [0] * steps
    for t in range(steps - 1, -1, -1):
        option = int(choice[t][end])
        picks[t] = option
        end -= int_costs[t][option]
    return picks
