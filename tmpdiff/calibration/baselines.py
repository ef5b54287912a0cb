"""Baselines on the same calibration set and costs: uniform, heuristic mixes, evolutionary, exhaustive."""

from __future__ import annotations

import itertools

import numpy as np

from tmpdiff.calibration.search import Problem, Schedule


def uniform(problem: Problem) -> dict[str, Schedule]:
    """Every level at every step."""
    return {f"uniform {p}": tuple([p] * problem.steps) for p in problem.all_levels}


def cheap_positions(kind: str, steps: int, k: int) -> list[int]:
    """Which k steps a heuristic makes cheap: the first k, the last k, or k spread evenly."""
    if k <= 0:
        return []
    if kind == "cheap first":
        return list(range(k))
    if kind == "cheap last":
        return list(range(steps - k, steps))
    if kind == "interleaved":
        return sorted({int(round(i * steps / k + (steps / k - 1) / 2)) for i in range(k)})
    raise ValueError(kind)


HEURISTICS = ("cheap first", "cheap last", "interleaved")


def two_level(problem: Problem, cheap: str, positions: list[int]) -> Schedule:
    return tuple(cheap if t in positions else problem.reference for t in range(problem.steps))


def heuristics_at_budget(problem: Problem, cheap: str, budget: float) -> dict[str, Schedule]:
    """Each heuristic with as many `cheap` steps as it takes to fit the budget (the same count for all)."""
    per_step_saving = problem.cost[problem.reference] - problem.cost[cheap]
    excess = problem.steps * problem.cost[problem.reference] - budget
    k = min(problem.steps, max(0, int(np.ceil(excess / per_step_saving - 1e-9))))
    return {kind: two_level(problem, cheap, cheap_positions(kind, problem.steps, k)) for kind in HEURISTICS}


def evolutionary(problem: Problem, budget: float, evaluations: int, seed: int = 0, population: int = 8) -> Schedule:
    """A (mu + lambda) evolutionary search over schedules within the budget, given a fixed number of evaluations.

    Mutations move one step to another level; offspring over budget are repaired by lowering random steps.
    Fitness is the measured error (cached evaluations still count against the budget).
    """
    rng = np.random.default_rng(seed)
    levels, rank = problem.all_levels, problem.rank

    def repair(schedule: list[str]) -> list[str]:
        while not problem.fits(schedule, budget):
            candidates = [t for t, p in enumerate(schedule) if rank[p] < len(levels) - 1]
            t = int(rng.choice(candidates))
            schedule[t] = levels[rank[schedule[t]] + 1]
        return schedule

    spent = 0
    scored: dict[Schedule, float] = {}

    def fitness(schedule: Schedule) -> float:
        nonlocal spent
        if schedule not in scored:
            spent += 1
            scored[schedule] = problem.error(schedule)
        return scored[schedule]

    pop = [tuple(repair([str(rng.choice(levels)) for _ in range(problem.steps)])) for _ in range(population)]
    problem.prefetch(pop[:evaluations])
    for schedule in pop:
        if spent < evaluations:
            fitness(schedule)
    stale = 0  # offspring already seen in a row: a small search space can run out of new schedules
    while spent < evaluations and stale < 200:
        parents = sorted(scored, key=scored.get)[:population]
        parent = list(parents[int(rng.integers(len(parents)))])
        for _ in range(1 + int(rng.integers(2))):
            t = int(rng.integers(problem.steps))
            parent[t] = str(rng.choice(levels))
        child = tuple(repair(parent))
        if child in scored:
            stale += 1
            continue
        stale = 0
        fitness(child)
    return min(scored, key=scored.get)


def exhaustive_two_level(problem: Problem, cheap: str) -> dict[int, tuple[Schedule, float]]:
    """For every number k of cheap steps, the schedule of minimal measured error (2^T evaluations)."""
    best: dict[int, tuple[Schedule, float]] = {}
    for bits in itertools.product((False, True), repeat=problem.steps):
        schedule = tuple(cheap if b else problem.reference for b in bits)
        k = sum(bits)
        error = problem.error(schedule)
        if k not in best or error < best[k][1]:
            best[k] = (schedule, error)
    return best
