"""Local refinement of a schedule with real evaluations: exchange levels between steps while it helps.

The additive scores ignore how steps interact, so the knapsack answer can sit off the measured optimum.
Starting from it, moves that keep the schedule within the budget are tried: swap the levels of two steps
(cost unchanged), swap two adjacent steps of one level with two adjacent steps of another, raise one step (when the
budget has room), raise one step and lower another, raise one step and pay for it with as many lowerings as it takes,
or lower one step alone (cheaper). The pair swap and the lone lowering are there because the errors of adjacent cheap
steps can partly cancel, which no additive score sees. The raise paid by several lowerings is there because with
close level costs (fp8 0.55 and int4 0.45 of fp32, say) one lowering never pays for raising a step to the reference,
so no move of one or two steps reaches a schedule with a reference step from one without. Candidates are tried in
the order an `InteractionModel` predicts best (ties: nearer steps first): the down-scores with the measured interaction
of every two adjacent cheapest steps (`Sensitivities.score_paired`), corrected after every evaluation by a fit to
every schedule measured so far, since the error of several cheap steps together is far from the sum of their
one-step errors. The first move whose *measured* error is lower is taken and the neighbourhood rebuilt. It stops when
no move helps or after `max_evaluations` new evaluations, so it never returns a schedule worse than its start on the
metric it measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tmpdiff.calibration.interactions import InteractionModel
from tmpdiff.calibration.knapsack import BUDGET_TOLERANCE
from tmpdiff.calibration.search import Problem, Schedule, Sensitivities, tmpdiff_search

Move = tuple[tuple[int, str], ...]  # (step, its new level) for every step the move changes


@dataclass
class Refined:
    schedule: Schedule
    error: float
    start_error: float
    evaluations: int  # new schedules evaluated by the refinement
    moves: list[Move] = field(default_factory=list)  # the moves taken, in order


def neighbours(problem: Problem, schedule: Schedule, budget: float, sens: Sensitivities | None
               ) -> list[tuple[float, int, Schedule, Move]]:
    """Every in-budget move (swap, pair swap, raise, raise-and-lower, raise paid by several lowerings, lower), with its
    predicted score change, best first (ties: the move spanning fewer steps first)."""
    rank = problem.rank  # 0 = reference (dearest)
    limit = budget * (1 + BUDGET_TOLERANCE)
    out = []
    seen: set[Schedule] = set()
    T = problem.steps
    current_score = sens.score_paired(schedule) if sens is not None else 0.0

    def add(*changes: tuple[int, str]) -> None:
        candidate = list(schedule)
        for t, level in changes:
            candidate[t] = level
        key = tuple(candidate)
        if key == schedule or key in seen or problem.schedule_cost(key) > limit:
            return
        seen.add(key)
        delta = sens.score_paired(key) - current_score if sens is not None else 0.0
        if math.isnan(delta):  # both scores infinite (a level not offered at a step): no prediction
            delta = 0.0
        span = max(t for t, _ in changes) - min(t for t, _ in changes)
        out.append((delta, span, key, changes))

    for t in range(T):
        for u in range(t + 1, T):
            if schedule[t] != schedule[u]:
                add((t, schedule[u]), (u, schedule[t]))  # swap
        for level in problem.all_levels:
            if rank[level] < rank[schedule[t]]:
                add((t, level))  # raise t alone
                for u in range(T):
                    if u != t:
                        for lower in problem.all_levels:
                            if rank[lower] > rank[schedule[u]]:
                                add((t, level), (u, lower))  # raise t, lower u
            elif rank[level] > rank[schedule[t]]:
                add((t, level))  # lower t alone
        if sens is not None:
            for level in problem.all_levels[: rank[schedule[t]]]:
                paid = raise_and_pay(problem, schedule, t, level, limit, sens)
                if paid is not None:
                    add(*paid)  # raise t, lower as many others as it takes
    # Move two adjacent steps of one level to two adjacent steps of another: adjacent cheap steps interact (their
    # errors can partly cancel), so the best place for a pair is often not where either step is best alone.
    for t in range(T - 1):
        for u in range(t + 2, T - 1):
            a, b = schedule[t], schedule[u]
            if a != b and schedule[t + 1] == a and schedule[u + 1] == b:
                add((t, b), (t + 1, b), (u, a), (u + 1, a))
    out.sort(key=lambda m: (m[0], m[1]))
    return out


def raise_and_pay(problem: Problem, schedule: Schedule, t: int, level: str, limit: float, sens: Sensitivities
                  ) -> Move | None:
    """Step `t` raised to `level`, then other steps lowered one level at a time, each time the lowering the scores
    predict costs least per unit of cost saved, until the schedule fits `limit`; None if it cannot fit."""
    levels, rank = problem.all_levels, problem.rank
    candidate = list(schedule)
    candidate[t] = level
    changes = {t: level}
    while problem.schedule_cost(candidate) > limit:
        base = sens.score_paired(candidate)
        best: tuple[float, int, str] | None = None
        for u, current in enumerate(candidate):
            # the next level down that saves something (a stated table may give two levels one cost)
            lower = next((p for p in levels[rank[current] + 1:] if problem.cost[p] < problem.cost[current]), None)
            if u == t or lower is None:
                continue
            trial = candidate.copy()
            trial[u] = lower
            per_cost = (sens.score_paired(trial) - base) / (problem.cost[current] - problem.cost[lower])
            if math.isnan(per_cost):
                per_cost = math.inf
            if best is None or per_cost < best[0]:
                best = (per_cost, u, lower)
        if best is None:
            return None
        _, u, lower = best
        candidate[u] = lower
        changes[u] = lower
    return tuple(sorted(changes.items()))


def refine(problem: Problem, start: Schedule, budget: float, max_evaluations: int,
           sens: Sensitivities | None = None, until: Callable[[Schedule], bool] | None = None) -> Refined:
    """First-improvement local search from `start` on measured errors, at most `max_evaluations` new evaluations.
    With `sens`, candidates are ordered by an `InteractionModel` refitted after each evaluation, and the schedules
    the sensitivities measured are not measured again. With `until`, it stops at the first schedule it reaches that
    `until` accepts (a quality floor met: `floor.meet_quality_floor`)."""
    current = tuple(start)
    best = start_error = problem.error(current)
    measured: dict[Schedule, float] = dict(sens.probes) if sens is not None else {}
    measured[current] = best
    model = InteractionModel(problem, sens) if sens is not None else None
    prefetched: set[Schedule] = set()
    moves: list[Move] = []
    spent = 0
    improved = True
    while improved and spent < max_evaluations and not (until is not None and until(current)):
        improved = False
        around = neighbours(problem, current, budget, sens)
        known_better = [m for m in around if m[2] in measured and measured[m[2]] < best]
        if known_better:  # a schedule measured before (a sensitivity probe) is better: take it for free
            _, _, current, move = min(known_better, key=lambda m: measured[m[2]])
            best, improved = measured[current], True
            moves.append(move)
            continue
        candidates = [m for m in around if m[2] not in measured]
        while candidates and spent < max_evaluations:
            if model is not None:
                model.fit(measured)
                predicted = model.predict([m[2] for m in candidates])
                order = sorted(range(len(candidates)), key=lambda i: (predicted[i], candidates[i][1]))
                candidates = [candidates[i] for i in order]
            _, _, candidate, move = candidates.pop(0)
            if problem.lookahead > 1 and candidate not in prefetched:  # the next candidates it may try, side by side
                batch = [candidate] + [m[2] for m in candidates[: min(problem.lookahead, max_evaluations - spent) - 1]]
                prefetched.update(batch)
                problem.prefetch(batch)
            spent += 1
            error = measured[candidate] = problem.error(candidate)
            if error < best:
                current, best = candidate, error
                moves.append(move)
                improved = True
                break
    return Refined(current, best, start_error, spent, moves)


def evaluation_cap(problem: Problem) -> int:
    """The linear-evaluation promise: 3 * T * L evaluations in all (L levels, reference included)."""
    return 3 * problem.steps * len(problem.all_levels)


def tmpdiff_refined(problem: Problem, budget: float, sens: Sensitivities, spent_so_far: int,
                    cap: int | None = None) -> tuple[Schedule, Refined]:
    """Knapsack over the additive scores, then refinement with what is left of the evaluation cap."""
    start, _ = tmpdiff_search(problem, budget, sens)
    left = max(0, (evaluation_cap(problem) if cap is None else cap) - spent_so_far)
    result = refine(problem, start, budget, left, sens)
    return result.schedule, result
