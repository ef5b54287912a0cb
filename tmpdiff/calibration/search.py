"""The TMPDiff schedule search (design §5): sensitivities + exact assignment, and segment bisection.

Both searches work on a `Problem`: T steps, a reference level, cheaper levels with per-step costs
(from a `tmpdiff.costs/1` table, measured or stated) and an evaluator that measures E(Z) with the real engines.

Non-finite errors: a schedule whose measured error is NaN or infinite, or whose run fell back to a higher precision at
a step whose output was not finite, counts as +inf error (`Problem.error`), so no
search chooses it while any schedule measured finite is on offer; where that makes a sensitivity infinite, the level
is not offered at that step (the knapsack drops the option).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from tmpdiff.calibration.evaluator import Evaluation
from tmpdiff.calibration.knapsack import solve_mckp, within_budget
from tmpdiff.calibration.sensitivity import SensitivityCurve, adaptive_curve, first_points
from tmpdiff.formats.errors import TmpdiffError

Schedule = tuple[str, ...]


@dataclass
class Problem:
    """What a search needs: steps, levels (reference first, then cheaper by cost), costs, metric, evaluator."""

    steps: int
    reference: str
    levels: list[str]  # cheaper levels, most expensive first
    cost: dict[str, float]  # per-step cost of each level (ms measured, or a stated ratio: only ratios matter)
    metric: str
    evaluate: Callable[[Sequence[str]], Evaluation]
    # schedules a search will (or may) ask next, evaluated side by side where evaluations fan out (`fanout`);
    # `lookahead` is how many run at once. Neither changes what a search returns or counts.
    prefetch: Callable[[Sequence[Sequence[str]]], None] = field(default=lambda _: None, repr=False)
    lookahead: int = 1

    @classmethod
    def create(cls, steps: int, reference: str, costs: dict[str, float], metric: str,
               evaluate: Callable[[Sequence[str]], Evaluation]) -> Problem:
        """Keep only levels cheaper than the reference: a level that is not cheaper can never pay off."""
        if reference not in costs:
            raise TmpdiffError(f"the costs table has no entry for the reference precision {reference} (it has "
                               f"{', '.join(costs) or 'none this build exported'}; --reference chooses another)")
        cheaper = sorted((p for p, c in costs.items() if p != reference and c < costs[reference]),
                         key=lambda p: -costs[p])
        if not cheaper:
            raise TmpdiffError(f"no precision in the costs table is cheaper than {reference}: nothing to schedule")
        return cls(steps, reference, cheaper, dict(costs), metric, evaluate)

    @property
    def all_levels(self) -> list[str]:
        return [self.reference, *self.levels]

    @cached_property
    def rank(self) -> dict[str, int]:
        """Each level's place in `all_levels`: 0 for the reference (dearest), then cheaper by one each."""
        return {p: i for i, p in enumerate(self.all_levels)}

    @property
    def cheapest(self) -> str:
        return self.levels[-1]

    def schedule_cost(self, schedule: Sequence[str]) -> float:
        return float(sum(self.cost[p] for p in schedule))

    def fits(self, schedule: Sequence[str], budget: float) -> bool:
        """Whether the schedule's cost is within the budget (`knapsack.within_budget`)."""
        return within_budget(self.schedule_cost(schedule), budget)

    def speedup(self, schedule: Sequence[str]) -> float:
        return self.steps * self.cost[self.reference] / self.schedule_cost(schedule)

    def error(self, schedule: Sequence[str]) -> float:
        """The measured error on the metric; +inf when it is not finite (NaN or Inf), so such a schedule is never
        preferred to one measured finite (comparisons with NaN are all False: min() kept a NaN that came first), and
        +inf when a step fell back to a higher precision (the NaN guard): its quality was the higher precision's while
        it is costed at the lower one, so that level is not to be chosen at that step."""
        evaluation = self.evaluate(schedule)
        value = evaluation.error(self.metric)
        return value if math.isfinite(value) and not evaluation.fallbacks else math.inf

    def max_speedup(self) -> float:
        return self.cost[self.reference] / self.cost[self.cheapest]

    def budget_for_speedup(self, speedup: float) -> float:
        if speedup < 1.0:
            raise TmpdiffError(f"speedup must be >= 1, got {speedup}")
        if speedup > self.max_speedup() * (1 + 1e-9):
            raise TmpdiffError(f"speedup {speedup:g} is out of reach: the all-{self.cheapest} schedule gives "
                               f"{self.max_speedup():.3f}x at most with these costs")
        # a target within the check's tolerance above the top speedup asks for all-cheapest: not for a budget that
        # float rounding puts just below all-cheapest's cost (no schedule would fit it)
        return max(self.steps * self.cost[self.reference] / speedup, self.schedule_cost([self.cheapest] * self.steps))


class CountingProblem(Problem):
    """A Problem whose evaluate records which distinct schedules a search asked for."""

    def __init__(self, base: Problem) -> None:
        super().__init__(base.steps, base.reference, base.levels, base.cost, base.metric, base.evaluate, base.prefetch,
                         base.lookahead)
        self.asked: set[tuple[str, ...]] = set()
        inner = base.evaluate

        def counted(schedule):
            self.asked.add(tuple(schedule))
            return inner(schedule)

        self.evaluate = counted


@dataclass
class Sensitivities:
    """d_t(p) from the reference (down) and u_t(p) from the all-cheapest schedule (up), per cheaper level."""

    down: dict[str, SensitivityCurve] = field(default_factory=dict)
    up: dict[str, SensitivityCurve] = field(default_factory=dict)
    cheap_error: float = 0.0
    # every schedule measured on the way (one-step probes, all-cheapest, adjacent pairs) -> its error
    probes: dict[Schedule, float] = field(default_factory=dict)
    # t -> measured error of steps t, t+1 at the cheapest level minus the sum of their one-step errors
    adjacent: dict[int, float] = field(default_factory=dict)
    cheapest: str = ""

    def best_probe(self, problem: Problem, budget: float) -> Schedule | None:
        """The measured probe of least error that fits the budget (None if none does)."""
        fits = [s for s in self.probes if problem.fits(s, budget)]
        return min(fits, key=self.probes.__getitem__) if fits else None

    def score_down(self, schedule: Sequence[str]) -> float:
        """S-down: sum of single-step downcast errors."""
        return float(sum(self.down[p].values[t] for t, p in enumerate(schedule) if p in self.down))

    def score_paired(self, schedule: Sequence[str]) -> float:
        """S-down plus the measured interaction of every two adjacent steps both at the cheapest level."""
        pairs = sum(self.adjacent.get(t, 0.0) for t in range(len(schedule) - 1)
                    if schedule[t] == schedule[t + 1] == self.cheapest)
        return self.score_down(schedule) + pairs

    def score_up(self, schedule: Sequence[str], cheapest: str) -> float:
        """S-up: E(all cheapest) minus the gains of every step raised above the cheapest level (+inf when the
        all-cheapest error was not finite: then no up curve was measured)."""
        return float(self.cheap_error - sum(self.up[p].values[t] for t, p in enumerate(schedule)
                                            if p != cheapest and p in self.up))


def measure_sensitivities(problem: Problem, tolerance: float = 0.05, directions: tuple[str, ...] = ("down", "up"),
                          pairs: bool = True) -> Sensitivities:
    """Adaptive-sampled d_t(p) and u_t(p) for every cheaper level: at most T evaluations per level and direction;
    with `pairs`, also every two adjacent steps at the cheapest level from the reference (T - 1 more). Adjacent
    cheap steps' errors can partly cancel, so a pair may beat every single cheap step; `tmpdiff_search` weighs the
    best probe that fits a budget against the knapsack's answers."""
    T, ref, cheap = problem.steps, problem.reference, problem.cheapest
    sens = Sensitivities()
    all_cheap = [cheap] * T

    def one_step(level: str, t: int, base: str) -> list[str]:
        return [level if i == t else base for i in range(T)]

    def measured(schedule: Sequence[str]) -> float:
        sens.probes[tuple(schedule)] = problem.error(schedule)
        return sens.probes[tuple(schedule)]

    curves = [(level, ref) for level in problem.levels if "down" in directions]
    curves += [(level, cheap) for level in [ref, *problem.levels[:-1]] if "up" in directions]
    # every curve's first points, side by side where evaluations fan out
    problem.prefetch([all_cheap] + [one_step(level, t, base) for level, base in curves for t in first_points(T)])
    sens.cheap_error = measured(all_cheap)
    if not math.isfinite(sens.cheap_error):  # gains from an infinite error say nothing: no up curves
        directions = tuple(d for d in directions if d != "up")
    for level in problem.levels:
        if "down" in directions:
            sens.down[level] = adaptive_curve(
                T, lambda t, level=level: measured(one_step(level, t, ref)), tolerance,
                lambda ts, level=level: problem.prefetch([one_step(level, t, ref) for t in ts]))
    if "up" in directions:
        for level in [ref, *problem.levels[:-1]]:
            sens.up[level] = adaptive_curve(
                T, lambda t, level=level: sens.cheap_error - measured(one_step(level, t, cheap)), tolerance,
                lambda ts, level=level: problem.prefetch([one_step(level, t, cheap) for t in ts]))
    if pairs and T > 1:
        adjacent = [[cheap if i in (t, t + 1) else ref for i in range(T)] for t in range(T - 1)]
        problem.prefetch(adjacent)
        sens.cheapest = cheap
        for t, schedule in enumerate(adjacent):
            single = sens.down[cheap].values[t] + sens.down[cheap].values[t + 1] if cheap in sens.down else 0.0
            interaction = measured(schedule) - float(single)
            sens.adjacent[t] = interaction if math.isfinite(interaction) else math.inf
    return sens


def _assign(problem: Problem, scores: list[list[float]], budget: float) -> Schedule:
    costs = [[problem.cost[p] for p in problem.all_levels] for _ in range(problem.steps)]
    picks = solve_mckp(costs, scores, budget)
    return tuple(problem.all_levels[i] for i in picks)


def assign_down(problem: Problem, sens: Sensitivities, budget: float) -> Schedule:
    """Minimise S-down under the budget (exact multiple-choice knapsack)."""
    scores = [[0.0] + [float(sens.down[p].values[t]) for p in problem.levels] for t in range(problem.steps)]
    return _assign(problem, scores, budget)


def assign_up(problem: Problem, sens: Sensitivities, budget: float) -> Schedule:
    """Minimise S-up under the budget: maximise the summed upcast gains."""
    scores = []
    for t in range(problem.steps):
        row = [-float(sens.up[p].values[t]) if p in sens.up else 0.0 for p in problem.all_levels]
        scores.append(row)
    return _assign(problem, scores, budget)


def tmpdiff_search(problem: Problem, budget: float, sens: Sensitivities) -> tuple[Schedule, list[Schedule]]:
    """Method B: both additive scores give a knapsack-optimal candidate; the better *measured* one wins, unless a
    probe measured with the sensitivities that fits the budget is better still (already paid for)."""
    answers = [assign_down(problem, sens, budget)] + ([assign_up(problem, sens, budget)] if sens.up else [])
    candidates = list(dict.fromkeys(answers))
    best = min(candidates, key=problem.error)
    probe = sens.best_probe(problem, budget)
    if probe is not None and probe not in candidates and problem.error(probe) < problem.error(best):
        best = probe
        candidates.append(probe)
    return best, candidates


def segment_bisection(problem: Problem, budget: float, sens: Sensitivities | None = None,
                      max_rounds: int = 6, max_evaluations: int | None = None) -> Schedule:
    """Method A: lower whole segments to each cheaper level in turn; split a segment whose error per unit of
    cost saved exceeds lambda. Lambda starts at a quarter of the all-cheapest schedule's error per unit of cost saved
    and doubles, for at most `max_rounds` rounds, until the budget holds; then the knapsack answer (or all-cheapest).
    With `max_evaluations` it asks for at most that many distinct schedules (uncapped it can ask for about
    6 (L - 1)(2T - 1)), then gives the knapsack answer if the budget does not hold yet; a budget only all-cheapest fits
    is answered without evaluations."""
    T, ref = problem.steps, problem.reference
    all_cheapest = [problem.cheapest] * T
    if not any(problem.fits(all_cheapest[1:] + [level], budget) for level in problem.all_levels[:-1]):
        return tuple(all_cheapest)
    asked: set[tuple[str, ...]] = {tuple(all_cheapest)}  # distinct schedules this search asked for

    def affordable(*schedules: list[str]) -> bool:
        return max_evaluations is None or len(asked | {tuple(s) for s in schedules}) <= max_evaluations

    current: list[str] = [ref] * T
    full_saving = problem.schedule_cost(current) - problem.schedule_cost([problem.cheapest] * T)
    # Start below the all-cheapest schedule's average rate: at exactly that rate the whole range
    # [1, T] is always accepted and the search overshoots any budget to the cheapest schedule.
    cheap_error = problem.error([problem.cheapest] * T)
    if not math.isfinite(cheap_error):  # the all-cheapest run was not finite: the down-scores' sum stands in
        down_sum = sens.score_down([problem.cheapest] * T) if sens is not None else math.nan
        cheap_error = down_sum if math.isfinite(down_sum) else 1.0
    lam = 0.25 * max(cheap_error, 1e-12) / max(full_saving, 1e-12)
    rank = problem.rank

    def down_score(a: int, b: int, level: str) -> float:
        if sens is None or level not in sens.down:
            return 0.0
        return float(sens.down[level].values[a : b + 1].sum())

    exhausted = False
    for _ in range(max_rounds):
        for level in problem.levels:
            if exhausted:
                break
            stack = [(0, T - 1)]
            while stack and not problem.fits(current, budget):
                a, b = stack.pop()
                candidate = [level if a <= i <= b and rank[p] < rank[level] else p for i, p in enumerate(current)]
                if candidate == current:
                    continue
                if not affordable(current, candidate):
                    exhausted = True
                    break
                asked |= {tuple(current), tuple(candidate)}
                added = problem.error(candidate) - problem.error(current)
                saved = problem.schedule_cost(current) - problem.schedule_cost(candidate)
                if math.isfinite(added) and added <= lam * saved:
                    current = candidate
                elif a < b:
                    m = (a + b) // 2
                    halves = sorted([(a, m), (m + 1, b)], key=lambda h: -down_score(*h, level))
                    stack.extend(halves)  # the half with the lower (better) score ends on top
        if problem.fits(current, budget) or exhausted:
            break
        lam *= 2.0
    if not problem.fits(current, budget):
        current = list(assign_down(problem, sens, budget)) if sens else [problem.cheapest] * T
    return tuple(current)


def random_schedules(problem: Problem, count: int, rng: np.random.Generator) -> list[Schedule]:
    """Random schedules over all levels, varied in how many steps are cheap (validation hold-out)."""
    out = []
    for _ in range(count):
        share = rng.uniform(0, 1)
        out.append(tuple(rng.choice(problem.levels) if rng.uniform() < share else problem.reference
                         for _ in range(problem.steps)))
    return out
