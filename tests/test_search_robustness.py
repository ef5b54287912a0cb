"""Searches on synthetic problems: non-finite measured errors, quality floors, NaN fallbacks during calibration.

Every problem here is a fake evaluator (an error formula per schedule), so these run in well under a second each.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tmpdiff.calibration.evaluator import Evaluation
from tmpdiff.calibration.knapsack import solve_mckp
from tmpdiff.calibration.refine import refine
from tmpdiff.calibration.search import Problem, measure_sensitivities, segment_bisection, tmpdiff_search
from tmpdiff.formats.errors import TmpdiffError

THREE = {"fp32": 1.0, "int8": 0.6, "int4": 0.45}


def _problem(steps: int, costs: dict[str, float], error):
    """A problem whose evaluations are `error(schedule)`, cached, with the distinct schedules run counted."""
    cache: dict[tuple[str, ...], Evaluation] = {}

    def evaluate(schedule):
        key = tuple(schedule)
        if key not in cache:
            e = error(key)
            cache[key] = Evaluation(key, e, 1.0 - e, 10.0)
        return cache[key]

    return Problem.create(steps, "fp32", costs, "latent", evaluate), cache


def _additive(weights: dict[str, np.ndarray]):
    def error(schedule) -> float:
        return float(sum(weights[p][t] for t, p in enumerate(schedule) if p in weights))

    return error


WEIGHTS6 = {"int8": np.full(6, 1e-3), "int4": np.array([5, 4, 3, 2, 1, 9.0]) * 1e-3}


def test_a_nan_error_is_never_chosen_and_refinement_leaves_it():
    """A NaN error that came first won `min` (every comparison with NaN is False) and refinement never improved on it
    (`error < nan` is False too): a non-finite error now counts as +inf."""
    base = _additive(WEIGHTS6)
    probe, _ = _problem(6, THREE, base)
    sens = measure_sensitivities(probe)
    budget = probe.budget_for_speedup(1.3)
    first, _ = tmpdiff_search(probe, budget, sens)  # the answer the NaN will be put on
    problem, _ = _problem(6, THREE, lambda s: math.nan if s == first else base(s))
    sens = measure_sensitivities(problem)
    best, candidates = tmpdiff_search(problem, budget, sens)
    assert first in candidates and best != first and math.isfinite(problem.error(best))
    assert problem.error(first) == math.inf
    refined = refine(problem, first, budget, 50, sens)  # started on the NaN schedule
    assert refined.schedule != first and math.isfinite(refined.error) and problem.fits(refined.schedule, budget)


def test_a_non_finite_all_cheapest_schedule_does_not_stop_the_search():
    """The all-cheapest schedule measuring NaN made every up-score NaN and the knapsack refused with an unnamed
    "scores must be finite": the up curves are skipped then (their gains are measured from that error)."""
    base = _additive(WEIGHTS6)
    problem, _ = _problem(6, THREE, lambda s: math.nan if s[2] == s[3] == "int4" else base(s))
    sens = measure_sensitivities(problem)
    assert sens.up == {} and sens.cheap_error == math.inf and sens.adjacent[2] == math.inf
    for speedup in (1.3, 1.6, 2.0):
        budget = problem.budget_for_speedup(speedup)
        start, _ = tmpdiff_search(problem, budget, sens)  # additive scores cannot see the pair: may be +inf
        refined = refine(problem, start, budget, 50, sens)
        assert math.isfinite(refined.error) and problem.fits(refined.schedule, budget)
        bisected = segment_bisection(problem, budget, sens)
        assert problem.fits(bisected, budget)


def test_a_level_whose_probe_is_not_finite_is_not_offered_at_that_step():
    """int4 overflows at step 2 (its one-step probe is NaN): the down-score there is +inf, the knapsack drops the
    option and the sensitivity curve is not interpolated across it."""
    weights = {"int4": np.full(5, 1e-3)}
    problem, _ = _problem(5, {"fp32": 1.0, "int4": 0.45}, lambda s: math.nan if s[2] == "int4" else _additive(weights)(s))
    sens = measure_sensitivities(problem)
    values = sens.down["int4"].values
    assert values[2] == math.inf and np.isfinite(np.delete(values, 2)).all()
    for k in range(5):  # k cheap steps: the most the budget allows without step 2 is 4
        budget = (5 - k) * 1.0 + k * 0.45
        best, _ = tmpdiff_search(problem, budget, sens)
        assert best[2] == "fp32" and best.count("int4") == k


def test_knapsack_drops_options_scored_inf_and_names_a_nan():
    costs = [[1.0, 0.5]] * 4
    inf = math.inf
    picks = solve_mckp(costs, [[0, 1], [0, inf], [0, 2], [0, 3]], 3.0)
    assert picks == [1, 0, 1, 0]  # the cheapest two scores among the offered; step 1's int option is not one
    with pytest.raises(TmpdiffError, match="no schedule fits"):  # step 1 at fp32: 2.5 at least
        solve_mckp(costs, [[0, 1], [0, inf], [0, 2], [0, 3]], 2.4)
    with pytest.raises(TmpdiffError, match="step 2, option 1 is nan"):
        solve_mckp(costs, [[0, 1], [0, 1], [0, math.nan], [0, 1]], 3.0)
    # steps sharing one cost row (calibration's case) go through the count model and the assignment
    many = solve_mckp([[1.0, 0.5]] * 12, [[0, inf if t % 3 == 0 else 1 + t] for t in range(12)], 9.0)
    assert sum(many) == 6 and all(many[t] == 0 for t in range(0, 12, 3))
    assert [t for t in range(12) if many[t]] == [1, 2, 4, 5, 7, 8]


@pytest.mark.parametrize("floor", [0.003, 0.005, 0.02])
def test_a_quality_floor_uses_what_it_measured(floor):
    """int4 is bad at step 7 only, which the adaptive sensitivities interpolate over (they sample steps 0, 4, 9): the
    knapsack puts int4 at step 7 at every budget below 8.9, and the budget bisection repeated that failing placement
    down to the dearest answer without it (`ffffffffii`, 1.12x, at each of these floors). Refining at a failing
    budget with real evaluations, and counting every measured schedule that meets the floor, finds the cheapest
    schedule meeting it, within 3*T*L evaluations plus 2 per bisection step."""
    from tmpdiff.calibration.floor import meet_quality_floor
    from tmpdiff.calibration.refine import evaluation_cap

    step7 = np.full(10, 1e-3)
    step7[7] = 5e-2
    error = _additive({"int4": step7})
    costs = {"fp32": 1.0, "int4": 0.45}
    problem, cache = _problem(10, costs, error)
    sens = measure_sensitivities(problem)
    assert 7 not in sens.down["int4"].sampled and sens.down["int4"].values[7] == pytest.approx(1e-3)
    before = len(cache)
    schedule, tried = meet_quality_floor(problem, sens, lambda e: e.latent_error <= floor,
                                         refine_evaluations=evaluation_cap(problem) - before)
    passing = [z for z in itertools.product(costs, repeat=10) if error(z) <= floor]
    cheapest = min(problem.schedule_cost(z) for z in passing)
    assert error(schedule) <= floor and problem.schedule_cost(schedule) == pytest.approx(cheapest)
    assert schedule[7] == "fp32" and problem.speedup(schedule) > 1.15
    assert len(cache) <= evaluation_cap(problem) + 2 * (10 + 1)  # the bound the docstring states


class _GuardedRunner:
    """A runner as the evaluator uses it, whose int4 engine overflows at step 2: the NaN guard re-runs that step at
    int8, so the run's latents carry int8's error there and its trace names the fallback (as `runtime.runner` does)."""

    ERROR = {"fp32": 0.0, "int8": 0.02, "int4": 0.03}

    def __init__(self):
        self.call_memo = None

    def sample(self, scheduler, labels, noise, precisions, timesteps=None):
        from tmpdiff.runtime.runner import RunResult
        from tmpdiff.runtime.trace import RunTrace, StepEvent

        events = [StepEvent(t, t, "int8" if (t, p) == (2, "int4") else p, 0.0, 0.0,
                            "int4" if (t, p) == (2, "int4") else None) for t, p in enumerate(precisions)]
        scale = 1.0 + sum(self.ERROR[e.precision] * (1 + t) for t, e in enumerate(events))
        return RunResult(latents=noise * scale, trace=RunTrace(events))


def test_a_step_that_fell_back_is_not_costed_as_the_cheap_level():
    """The runner's NaN guard re-runs a step whose output is not finite one precision up; the evaluator kept only the
    latents, so int4 at step 2 measured as good as int8 there (the fallback's quality) while costed as int4, and the
    search chose it. The evaluation now counts the steps that fell back, and such a schedule's error is infinite."""
    from tmpdiff.calibration.calibrate import fallback_note
    from tmpdiff.calibration.evaluator import Evaluator
    from tmpdiff.formats.manifest import SamplingInfo

    sampling = SamplingInfo(scheduler_class="DDIMScheduler", scheduler_config={}, num_classes=1, null_class=1,
                            image_size=8, channels=1, default_steps=4, guidance_scale=1.0)
    evaluator = Evaluator(runner=_GuardedRunner(), sampling=sampling, classes=[0], seeds=[0], reference="fp32", steps=4,
                          memo=None)
    fell = evaluator.evaluate(("fp32", "fp32", "int4", "fp32"))
    assert fell.fallbacks == 1 and evaluator.evaluate(("int4", "fp32", "fp32", "fp32")).fallbacks == 0
    problem = Problem.create(4, "fp32", THREE, "latent", evaluator.evaluate)
    assert problem.error(("fp32", "fp32", "int4", "fp32")) == math.inf
    sens = measure_sensitivities(problem)
    assert sens.down["int4"].values[2] == math.inf  # int4 not offered at step 2
    for speedup in (1.5, 1.8):  # the old code put int4 at step 2 at both
        budget = problem.budget_for_speedup(speedup)
        best, _ = tmpdiff_search(problem, budget, sens)
        refined = refine(problem, best, budget, 20, sens)
        assert refined.schedule[2] != "int4" and evaluator.evaluate(refined.schedule).fallbacks == 0
    assert evaluator.fell_back >= 1 and f"{evaluator.fell_back} of the evaluated" in fallback_note(evaluator)
