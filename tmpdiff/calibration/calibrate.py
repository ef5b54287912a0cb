"""`tmpdiff calibrate`: choose a per-step precision schedule for a speedup target or a quality floor."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tmpdiff.calibration.floor import meet_quality_floor
from tmpdiff.calibration.refine import evaluation_cap, refine
from tmpdiff.calibration.search import (
    Problem,
    Schedule,
    Sensitivities,
    measure_sensitivities,
    segment_bisection,
    tmpdiff_search,
)
from tmpdiff.calibration.session import CalibrationSession
from tmpdiff.engines.device import device_label
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.schedule import Figures
from tmpdiff.formats.schedule import Schedule as ScheduleFile

METHODS = ("sensitivity", "bisection")


@dataclass
class Target:
    """Exactly one of: a speedup over the all-reference schedule, a maximum error, a minimum SSIM."""

    speedup: float | None = None
    max_error: float | None = None
    min_ssim: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.speedup, self.max_error, self.min_ssim) if v is not None]
        if len(given) != 1:
            raise TmpdiffError("give exactly one target: --speedup X, --max-error E or --min-ssim S")
        if self.speedup is not None and not (math.isfinite(self.speedup) and self.speedup > 1):
            raise TmpdiffError(f"--speedup must be a finite number above 1, got {self.speedup}")
        if self.min_ssim is not None and not (math.isfinite(self.min_ssim) and 0 < self.min_ssim <= 1):
            raise TmpdiffError(f"--min-ssim must be in (0, 1], got {self.min_ssim}")
        if self.max_error is not None and not (math.isfinite(self.max_error) and self.max_error >= 0):
            raise TmpdiffError(f"--max-error must be a finite number >= 0, got {self.max_error}")

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class CalibrationResult:
    schedule: Schedule
    file: ScheduleFile
    sensitivities: Sensitivities
    candidates: list[Schedule]


def timing_device(session: CalibrationSession) -> str:
    """Where sampling was timed: backend and device of the loaded engines, e.g. 'ort, cpu: Intel(R) Xeon(R) ...'."""
    engine = next(iter(session.evaluator.runner.engines.values()))
    backend = {"OrtEngine": "ort", "TrtEngine": "trt"}.get(type(engine).__name__, type(engine).__name__)
    return f"{backend}, {device_label(engine.device)}, batch {len(session.evaluator.labels)}"


def check_target(problem: Problem, target: Target) -> float | None:
    """The cost budget for a speedup target (None for quality floors); unreachable targets fail before any evaluation."""
    if target.speedup is not None:
        return problem.budget_for_speedup(target.speedup)
    return None


def check_method(method: str, target: Target) -> None:
    """A known method, and one that serves the target: segment bisection searches a cost budget, so a quality floor
    (met by bisecting the budget of the sensitivity knapsack with real evaluations) takes the sensitivity method."""
    if method not in METHODS:
        raise TmpdiffError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "bisection" and target.speedup is None:
        raise TmpdiffError("--method bisection searches a speedup target (--speedup); --max-error and --min-ssim are "
                           "met by the sensitivity method")


def calibrate(session: CalibrationSession, target: Target, method: str = "sensitivity",
              tolerance: float = 0.05, timing_repeats: int = 3, refine_schedule: bool = True) -> CalibrationResult:
    """Run the search and verify the chosen schedule: its quality from a real evaluation, its speedup by timing
    sampling runs of it and of the all-reference schedule (median of `timing_repeats`, interleaved) here.

    With `refine_schedule` the knapsack answer for a speedup target is refined with real evaluations (level swaps
    while they help, `calibration.refine`) within 3*T*L evaluations in all; for a quality floor the knapsack answers
    that fail it are refined at their budgets within the same cap, plus 2 evaluations per budget bisection step
    (`meet_quality_floor`: at most 3*T*L + 22 in all)."""
    check_method(method, target)
    problem = session.problem
    budget = check_target(problem, target)
    sens = measure_sensitivities(problem, tolerance)
    if budget is not None:
        if method == "sensitivity":
            schedule, candidates = tmpdiff_search(problem, budget, sens)
            if refine_schedule:
                left = max(0, evaluation_cap(problem) - session.evaluator.runs)
                schedule = refine(problem, schedule, budget, left, sens).schedule
        else:
            left = max(0, evaluation_cap(problem) - session.evaluator.runs)
            schedule = segment_bisection(problem, budget, sens, max_evaluations=left)
            candidates = [schedule]
    else:
        if target.max_error is not None:
            def accept(e):
                return e.error(problem.metric) <= target.max_error
        else:
            def accept(e):
                return e.ssim >= target.min_ssim
        left = max(0, evaluation_cap(problem) - session.evaluator.runs) if refine_schedule else 0
        schedule, candidates = meet_quality_floor(problem, sens, accept, refine_evaluations=left)
    evaluation = problem.evaluate(schedule)
    if not math.isfinite(problem.error(schedule)):
        what = (f"fell back to a higher precision at {evaluation.fallbacks} step(s) (NaN/Inf output)"
                if evaluation.fallbacks else f"measured {problem.metric} error is {evaluation.error(problem.metric)}")
        raise TmpdiffError(f"the search ended on {' '.join(schedule)}, whose {what}: no schedule it measured within "
                           "the target was finite without a fallback")
    reference_s, schedule_s = session.evaluator.time_sampling([[problem.reference] * problem.steps, list(schedule)],
                                                              timing_repeats)
    file = ScheduleFile(
        steps=problem.steps,
        scheduler=session.scheduler_ref(),
        precisions=list(schedule),
        timesteps=None if session.evaluator.timesteps is None else list(session.evaluator.timesteps),
        reference=problem.reference,
        target=target.as_dict() | {"metric": problem.metric, "method": method},
        predicted=Figures(speedup=problem.speedup(schedule), error=_finite(sens.score_down(schedule)),
                          error_s_up=_finite(sens.score_up(schedule, problem.cheapest))),
        measured=Figures(speedup=reference_s / schedule_s, error=evaluation.error(problem.metric),
                         latent_error=evaluation.latent_error, ssim=evaluation.ssim,
                         psnr=evaluation.psnr if evaluation.psnr != float("inf") else None,
                         device=timing_device(session), reference_ms=reference_s * 1e3, schedule_ms=schedule_s * 1e3,
                         repeats=timing_repeats),
        evaluations=session.evaluator.runs,
        costs=session.costs.provenance() | {f"per_step_{session.costs.unit}": problem.cost},
    )
    return CalibrationResult(schedule, file, sens, candidates)


def fallback_note(evaluator) -> str | None:
    """What calibrate prints when evaluated schedules fell back to a higher precision (None when none did)."""
    count = getattr(evaluator, "fell_back", 0)
    if not count:
        return None
    return (f"{count} of the evaluated schedules fell back to a higher precision at some step (NaN/Inf output): "
            "scored as infinite error, never chosen")


def _finite(value: float) -> float | None:
    """A predicted score, or None where it is infinite (a level not offered at a step, no up curves)."""
    return value if math.isfinite(value) else None
