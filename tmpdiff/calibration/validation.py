"""Does additivity rank schedules? Measured E(Z) against the S-down and S-up scores on held-out schedules."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from tmpdiff.calibration.baselines import HEURISTICS, cheap_positions, two_level
from tmpdiff.calibration.search import Problem, Schedule, Sensitivities, random_schedules


@dataclass
class Fit:
    """Linear fit E ~ a*S + b with its R^2, and the rank correlation that matters for choosing schedules; None for
    each when there is nothing to fit (fewer than 3 schedules, or one score or error for all)."""

    slope: float | None
    intercept: float | None
    r2: float | None
    spearman: float | None

    @classmethod
    def of(cls, scores: np.ndarray, measured: np.ndarray) -> Fit:
        if len(scores) < 3 or np.ptp(scores) == 0 or np.ptp(measured) == 0:
            return cls(None, None, None, None)
        fit = stats.linregress(scores, measured)
        return cls(float(fit.slope), float(fit.intercept), float(fit.rvalue**2),
                   float(stats.spearmanr(scores, measured).statistic))


def held_out_schedules(problem: Problem, count: int = 24, seed: int = 1) -> dict[str, list[Schedule]]:
    """Random schedules and the structured two-level mixes at several cheap-step counts."""
    rng = np.random.default_rng(seed)
    structured = []
    for k in sorted({max(1, problem.steps // 4), problem.steps // 2, (3 * problem.steps) // 4}):
        for kind in HEURISTICS:
            structured.append(two_level(problem, problem.cheapest, cheap_positions(kind, problem.steps, k)))
    return {"random": random_schedules(problem, count, rng), "structured": list(dict.fromkeys(structured))}


def validate(problem: Problem, sens: Sensitivities, groups: dict[str, list[Schedule]]) -> dict:
    """Measured error vs both scores per group and over all held-out schedules."""
    rows = []
    for group, schedules in groups.items():
        for schedule in schedules:
            rows.append({"group": group, "schedule": list(schedule), "measured": problem.error(schedule),
                         "s_down": sens.score_down(schedule), "s_up": sens.score_up(schedule, problem.cheapest),
                         "cheap_steps": sum(p != problem.reference for p in schedule)})
    result: dict = {"rows": rows, "fits": {}}
    for group in [*groups, "all"]:
        chosen = [r for r in rows if group == "all" or r["group"] == group]
        measured = np.array([r["measured"] for r in chosen])
        result["fits"][group] = {score: Fit.of(np.array([r[score] for r in chosen]), measured).__dict__
                                 for score in ("s_down", "s_up")}
    return result
