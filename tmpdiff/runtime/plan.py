"""Which precision each step runs: a schedule (file, object or list), or one precision for every step; a
`tmpdiff.schedule/2` file may also name the timestep of each step (then its length is the step count).

The one place a run's "--schedule FILE or --precision P" is resolved, for `tmpdiff run`, `run --pipeline`
and the diffusers drop-in; checked before any engine is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from tmpdiff.formats.atomic import read_text_file, validation_problems
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.precisions import get_precision
from tmpdiff.formats.schedule import MAX_STEPS, Schedule, load_schedule
from tmpdiff.formats.tmpq_plan import TmpqPlan, load_tmpq_plan
from tmpdiff.runtime.time_conditioning import TimeConditioning, load_conditioning


@dataclass(frozen=True)
class PrecisionPlan:
    """Per-step precisions; `steps` is None for a uniform precision that fits any step count."""

    precisions: tuple[str, ...] | None
    uniform: str | None
    source: str  # where it came from, for messages and reports
    file: Schedule | None = None  # the schedule it was read from (its scheduler is the one to sample with)
    conditioning: TimeConditioning | None = None  # a /3 schedule's learned time embeddings or timestep shifts
    tmpq: TmpqPlan | None = None  # the TMPQ-DM plan it was read from (a schedule is none)

    def check_model(self, manifest) -> None:
        """A TMPQ-DM plan runs only on the build it was searched on (its layer configurations are that model's)."""
        problem = None if self.tmpq is None else self.tmpq.build_problem(manifest)
        if problem is not None:
            raise TmpdiffError(problem, self.source)

    @property
    def steps(self) -> int | None:
        return None if self.precisions is None else len(self.precisions)

    @property
    def timesteps(self) -> list[int] | None:
        """The training timesteps the schedule samples at, in sampling order (None: the scheduler's own spacing)."""
        return None if self.file is None or self.file.timesteps is None else list(self.file.timesteps)

    @property
    def needed(self) -> list[str]:
        """The precisions that must have engines."""
        return list(dict.fromkeys(self.precisions)) if self.precisions is not None else [self.uniform]

    def at(self, index: int) -> str:
        return self.uniform if self.precisions is None else self.precisions[index]

    def schedule(self) -> Schedule:
        """As a schedule file object (a uniform plan must have a step count by now)."""
        if self.precisions is None:
            raise TmpdiffError(f"{self.source}: a uniform plan has no step count")
        return Schedule(steps=len(self.precisions), precisions=list(self.precisions),
                        reference=self.uniform or "fp32")


def resolve_plan(schedule: Schedule | str | Path | list[str] | None = None, precision: str | None = None, *,
                 steps: int | None = None, default_steps: int | None = None) -> PrecisionPlan:
    """Exactly one of a schedule or a precision. A uniform precision gets `steps` (or `default_steps`) steps when
    either is given and stays step-count free otherwise; a schedule's length must equal `steps` when given."""
    if (schedule is None) == (precision is None):
        raise TmpdiffError("give exactly one of a schedule (--schedule FILE) or a uniform precision (--precision P)")
    if precision is not None:
        get_precision(precision)  # unknown names list the known ones
        count = steps if steps is not None else default_steps  # 0 is refused below, not taken for the default
        if count is not None and not 1 <= count <= MAX_STEPS:
            raise TmpdiffError(f"{count} steps: a run takes 1..{MAX_STEPS} (no scheduler has more training timesteps)")
        per_step = None if count is None else (precision,) * count
        return PrecisionPlan(per_step, precision, f"uniform {precision}")
    source = "schedule"
    if isinstance(schedule, (str, Path)):
        source = str(schedule)
        if is_tmpq_plan(Path(schedule)):
            return _tmpq_plan(Path(schedule), steps)
        schedule = load_schedule(schedule)
    elif isinstance(schedule, list):
        try:
            schedule = Schedule(steps=len(schedule), precisions=schedule)
        except ValidationError as exc:
            raise TmpdiffError(f"not a valid schedule ({validation_problems(exc)})") from None
    if steps is not None and steps != schedule.steps:
        raise TmpdiffError(f"schedule has {schedule.steps} steps but --steps {steps} was given",
                           source if source != "schedule" else None)
    if schedule.time_embeddings is not None and source == "schedule":
        raise TmpdiffError("a schedule that names a time-embeddings file is read from its file (the name is relative "
                           "to the schedule's directory)")
    conditioning = None if source == "schedule" else load_conditioning(schedule, Path(source))
    return PrecisionPlan(tuple(schedule.precisions), None, source, schedule, conditioning)


def is_tmpq_plan(path: Path) -> bool:
    """Whether a plan file is a TMPQ-DM plan (`tmpdiff.tmpq-plan/...`) rather than a schedule."""
    try:
        data = json.loads(read_text_file(path, "schedule"))
    except (TmpdiffError, ValueError, RecursionError):
        return False  # the schedule reader names the problem
    return isinstance(data, dict) and str(data.get("format", "")).startswith("tmpdiff.tmpq-plan/")


def _tmpq_plan(path: Path, steps: int | None) -> PrecisionPlan:
    return tmpq_precision_plan(load_tmpq_plan(path), path, steps)


def tmpq_precision_plan(plan: TmpqPlan, path: Path, steps: int | None = None) -> PrecisionPlan:
    """A loaded TMPQ-DM plan (read from `path`) as the runner's plan: step i runs its layer configuration's engine (a
    precision when the configuration is uniform, else the deployed `mixed-...` graph) at the plan's timestep i, with
    the plan's scheduler."""
    from collections import Counter

    from tmpdiff.formats.manifest import mixed_name

    if steps is not None and steps != plan.steps:
        raise TmpdiffError(f"plan has {plan.steps} steps but --steps {steps} was given", path)
    configs = plan.step_precisions()
    engines = tuple(plan.uniform_engine(c) or mixed_name(plan.layers, list(c)) for c in configs)
    # the schedule view: the plan's timesteps and scheduler, each step's most common layer precision (for reports)
    try:
        view = Schedule(steps=plan.steps, scheduler=plan.scheduler, timesteps=list(plan.timesteps),
                        precisions=[plan.uniform_engine([Counter(c).most_common(1)[0][0]]) for c in configs])
    except ValidationError as exc:
        raise TmpdiffError(f"not a runnable TMPQ-DM plan ({validation_problems(exc)})", path) from None
    return PrecisionPlan(engines, None, str(path), view, tmpq=plan)
