"""Local refinement of a schedule with real evaluations: exchange levels between steps while it helps.

The additive scores ignore how steps interact, so the knapsack answer can sit off the measured optimum.
Starting from it, moves that keep the schedule within the budget are tried: swap the levels of two steps
(cost unchanged), raise one step (when the budget has room), raise one step and lower another, or lower one step
alone (cheaper; it helps where the errors of adjacent cheap steps partly cancel, which no additive score sees). Candidates
are tried in the order the additive down-score predicts best (ties: nearer steps first); the first move whose
*measured* error is lower is taken and the neighbourhood rebuilt. It stops when no move helps or after
`max_evaluations` new evaluations, so it never returns a schedule worse than its start on the metric it measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tmpdiff.calibration.search import Problem, Schedule, Sensitivities, tmpdiff_search


@dataclass
class Refined:
    schedule: Schedule
    error: float
    start_error: float
    evaluations: int  # new schedules evaluated by the refinement
    moves: list[tuple[int, int, str, str]] = field(default_factory=list)  # (t, u, level at t, level at u) taken


def _down(sens: Sensitivities | None, level: str, t: int) -> float:
    if sens is None or level not in sens.down:
        return 0.0
    return float(sens.down[level].values[t])


def neighbours(problem: Problem, schedule: Schedule, budget: float, sens: Sensitivities | None
               ) -> list[tuple[float, int, Schedule, tuple[int, int, str, str]]]:
    """Every in-budget move (swap, raise, raise-and-lower, lower), with its predicted score change, best first."""
    rank = {p: i for i, p in enumerate(problem.all_levels)}  # 0 = reference (dearest)
    limit = budget * (1 + 1e-9)
    out = []
    seen: set[Schedule] = set()
    T = problem.steps

    def add(t: int, u: int, pt: str, pu: str) -> None:
        candidate = list(schedule)
        candidate[t] = pt
        if u >= 0:
            candidate[u] = pu
        key = tuple(candidate)
        if key == schedule or key in seen or problem.schedule_cost(key) > limit:
            return
        seen.add(key)
        delta = _down(sens, pt, t) - _down(sens, schedule[t], t)
        if u >= 0:
            delta += _down(sens, pu, u) - _down(sens, schedule[u], u)
        out.append((delta, abs(t - u) if u >= 0 else 0, key, (t, u, pt, pu)))

    for t in range(T):
        for u in range(T):
            if u != t and schedule[t] != schedule[u] and t < u:
                add(t, u, schedule[u], schedule[t])  # swap
        for level in problem.all_levels:
            if rank[level] < rank[schedule[t]]:
                add(t, -1, level, "")  # raise t alone
                for u in range(T):
                    if u != t:
                        for lower in problem.all_levels:
                            if rank[lower] > rank[schedule[u]]:
                                add(t, u, level, lower)  # raise t, lower u
            elif rank[level] > rank[schedule[t]]:
                add(t, -1, level, "")  # lower t alone
    out.sort(key=lambda m: (m[0], m[1]))
    return out


def refine(problem: Problem, start: Schedule, budget: float, max_evaluations: int,
           sens: Sensitivities | None = None) -> Refined:
    """First-improvement local search from `start` on measured errors, at most `max_evaluations` new evaluations."""
    current = tuple(start)
    best = start_error = problem.error(current)
    evaluated: set[Schedule] = {current}
    moves: list[tuple[int, int, str, str]] = []
    spent = 0
    improved = True
    while improved and spent < max_evaluations:
        improved = False
        candidates = [m for m in neighbours(problem, current, budget, sens) if m[2] not in evaluated]
        for i, (_, _, candidate, move) in enumerate(candidates):
            if spent >= max_evaluations:
                break
            if problem.lookahead > 1 and i % problem.lookahead == 0:  # the next candidates it may try, side by side
                problem.prefetch([m[2] for m in candidates[i : i + min(problem.lookahead, max_evaluations - spent)]])
            evaluated.add(candidate)
            spent += 1
            error = problem.error(candidate)
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
