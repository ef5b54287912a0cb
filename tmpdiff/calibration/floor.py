"""Quality floors (`--max-error`, `--min-ssim`): the cheapest measured schedule whose quality passes, by bisecting the
cost budget over the knapsack answers and refining those that fail (`meet_quality_floor`). Apart from `search`
because it refines: `refine` builds on `search`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from tmpdiff.calibration.evaluator import Evaluation
from tmpdiff.calibration.knapsack import within_budget
from tmpdiff.calibration.refine import evaluation_cap, refine
from tmpdiff.calibration.search import Problem, Schedule, Sensitivities, tmpdiff_search


def meet_quality_floor(problem: Problem, sens: Sensitivities | None, accept: Callable[[Evaluation], bool],
                       iterations: int = 10, refine_evaluations: int | None = None) -> tuple[Schedule, list[Schedule]]:
    """The cheapest measured schedule whose quality passes `accept`: bisect the cost budget with real evaluations.

    At each budget the knapsack answer (`tmpdiff_search`) is measured; when it fails the floor, `refine.refine` improves
    it at that budget with real evaluations until one passes (or no move helps, or its allowance is spent). A budget
    passes when any schedule measured so far that fits it meets the floor, and the bisection goes on below it. The
    answer is the cheapest of *every* schedule measured meeting the floor (the sensitivities' probes, the knapsack
    answers, every schedule a refinement measured; lower error breaks a tie), or the all-reference schedule if none does.
    A measured error that is not finite never passes (`Problem.error`).

    Evaluations: at most 2 per knapsack answer (its down and up answers; probes are already measured), so
    2 * (iterations + 1) for the bisection, plus `refine_evaluations` in all for the refinements (None: the whole
    3*T*L cap, `refine.evaluation_cap`; `calibrate` passes what the sensitivities left of it). Through `calibrate`
    that is at most 3*T*L + 2 * (iterations + 1) evaluations: 3*T*L + 22 with the default 10 iterations."""
    T = problem.steps
    measured: dict[Schedule, Evaluation] = {}

    def evaluate(schedule: Sequence[str]) -> Evaluation:
        evaluation = problem.evaluate(schedule)
        measured[tuple(schedule)] = evaluation
        return evaluation

    # the same problem, keeping every schedule the floor search measures (refinement's included)
    recording = Problem(problem.steps, problem.reference, problem.levels, problem.cost, problem.metric, evaluate,
                        problem.prefetch, problem.lookahead)

    def passes(schedule: Sequence[str]) -> bool:
        return math.isfinite(recording.error(schedule)) and bool(accept(recording.evaluate(schedule)))

    def cheapest_passing() -> tuple[float, float, Schedule] | None:
        # costs to 12 digits: one cost summed in another order must tie (then the lower error wins)
        passing = [(float(f"{problem.schedule_cost(s):.12g}"), recording.error(s), s) for s in list(measured)
                   if passes(s)]
        return min(passing) if passing else None

    for probe in (sens.probes if sens is not None else {}):  # measured already: free
        recording.evaluate(probe)
    left = evaluation_cap(problem) if refine_evaluations is None else refine_evaluations
    low, high = T * problem.cost[problem.cheapest], T * problem.cost[problem.reference]
    tried = []
    cheapest_candidate, _ = tmpdiff_search(recording, low * (1 + 1e-9), sens)
    tried.append(cheapest_candidate)
    if passes(cheapest_candidate):
        return cheapest_candidate, tried
    for _ in range(iterations):
        mid = (low + high) / 2
        candidate, _ = tmpdiff_search(recording, mid, sens)
        tried.append(candidate)
        if not passes(candidate) and left > 0:  # what the additive scores miss, measured at this budget
            refined = refine(recording, candidate, mid, left, sens, until=passes)
            left -= refined.evaluations
            if refined.schedule != candidate:
                tried.append(refined.schedule)
        best = cheapest_passing()
        if best is not None and within_budget(best[0], mid):
            high = mid
        else:
            low = mid
    best = cheapest_passing()
    return (best[2] if best is not None else tuple([problem.reference] * T)), tried
