"""Exact multiple-choice knapsack by dynamic programming over discretised cost.

Each step t picks one level p with cost c[t][p] and score s[t][p]; minimise the summed score subject to
the summed cost staying within the budget. Costs are rounded up to integer units of budget/resolution,
so every returned choice is feasible in exact costs; the optimum is exact on the discretised costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tmpdiff.errors import TmpdiffError


def solve_mckp(costs: Sequence[Sequence[float]], scores: Sequence[Sequence[float]], budget: float,
               resolution: int = 2000) -> list[int]:
    """Index of the chosen option per step, minimising sum(scores) with sum(costs) <= budget."""
    steps = len(costs)
    if steps == 0:
        return []
    if budget <= 0:
        raise TmpdiffError(f"cost budget must be positive, got {budget}")
    unit = budget / resolution
    int_costs = [[math.ceil(c / unit - 1e-9) for c in row] for row in costs]
    cheapest = sum(min(row) for row in int_costs)
    if cheapest > resolution:
        raise TmpdiffError("no schedule fits the cost budget (even the cheapest level at every step costs more)")
    inf = float("inf")
    best = np.full(resolution + 1, inf)
    best[0] = 0.0
    choice = np.full((steps, resolution + 1), -1, dtype=np.int32)
    for t in range(steps):
        nxt = np.full(resolution + 1, inf)
        for option, (c, s) in enumerate(zip(int_costs[t], scores[t], strict=True)):
            if c > resolution:
                continue
            shifted = np.full(resolution + 1, inf)
            shifted[c:] = best[: resolution + 1 - c] + s
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
