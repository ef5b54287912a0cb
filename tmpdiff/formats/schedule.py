"""`schedule.json`: which precision runs each denoising step (format `tmpdiff.schedule/1`), and optionally at which
training timestep (`tmpdiff.schedule/2`).

Version 2 adds one optional field, `timesteps`: a list parallel to `precisions` (step i samples at training timestep
`timesteps[i]` with `precisions[i]`). A parallel list rather than a per-step `{"precision", "timestep"}` object,
because: `precisions` keeps the shape every v1 file, reader and report has; custom timesteps are all or nothing
(a scheduler's `set_timesteps(timesteps=[...])` takes the whole list, so a per-step field that some steps omit
would be a state with no meaning); and the list is what the diffusers scheduler and pipeline are handed as is.

Version 3 adds `time_embeddings`: the name of a `tmpdiff.time_embeddings/1` file (MTEO rows or per-step timestep
shifts, `tmpdiff distill-embeddings`), relative to the schedule file's directory and inside it, whose steps and
timesteps the run checks against its own. MTEO rows need graphs exported with `--time-embedding-input`; shifts
run on any graph.

v1 files read unchanged. A schedule is written in the lowest version that holds it: `/1` without timesteps (so
tmpdiff versions that know only `/1` keep reading calibration outputs), `/2` with them, `/3` with time embeddings;
a file that names a field its version does not have is refused.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from tmpdiff.formats.atomic import read_model_file, write_json
from tmpdiff.formats.config_values import check_scheduler_counts, decode_non_finite, encode_non_finite
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.precisions import PRECISIONS

# Steps a schedule, a plan or a run may have: ten times diffusers' 1,000 training timesteps, so never the limit a
# scheduler sets, but a bound checked before any per-step list is built.
MAX_STEPS = 10_000

SCHEDULE_FORMAT_V1 = "tmpdiff.schedule/1"
SCHEDULE_FORMAT = "tmpdiff.schedule/2"  # /2 adds the optional per-step `timesteps`; /1 still reads
SCHEDULE_FORMAT_V3 = "tmpdiff.schedule/3"  # /3 adds `time_embeddings` (a file beside the schedule)


class SchedulerRef(BaseModel):
    """The diffusers scheduler a schedule was calibrated with (non-finite config values as "inf"/"-inf"/"nan")."""

    model_config = ConfigDict(extra="forbid")
    class_name: str
    config: dict

    @field_validator("config", mode="before")
    @classmethod
    def _read_non_finite(cls, config: dict) -> dict:
        return check_scheduler_counts(decode_non_finite(config)) if isinstance(config, dict) else config

    @field_serializer("config")
    def _write_non_finite(self, config: dict) -> dict:
        return encode_non_finite(config)


class Figures(BaseModel):
    """What calibration predicted (from costs and additive scores) or measured (real engines) for a schedule.

    Every field is optional: `predicted` fills speedup, error (S-down) and error_s_up; `measured` fills
    the quality figures and the timed speedup with where and how it was timed. Unknown keys are kept
    (extra="allow") so a reader of this format version still loads files from a writer that adds fields.
    """

    model_config = ConfigDict(extra="allow")
    speedup: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    error: float | None = Field(default=None, allow_inf_nan=False)  # the metric the search minimised
    error_s_up: float | None = Field(default=None, allow_inf_nan=False)  # predicted: S-up score (may be < 0)
    latent_error: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # mean relative latent MSE
    ssim: float | None = Field(default=None, ge=-1, le=1, allow_inf_nan=False)  # mean SSIM vs the reference
    psnr: float | None = Field(default=None, allow_inf_nan=False)  # mean PSNR in dB; null where identical
    device: str | None = None  # measured: where the speedup was timed (backend and device)
    reference_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # measured: all-reference sampling
    schedule_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # measured: this schedule's sampling
    repeats: int | None = Field(default=None, ge=1)  # measured: timed runs of each (medians are recorded)

    @model_serializer(mode="wrap")
    def _given_fields_only(self, handler):
        """Write the figures that were given (a null psnr included), not every declared field as null."""
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set or k in (self.model_extra or {})}


class Schedule(BaseModel):
    """T precisions for T steps (and, from /2, optionally the T training timesteps they run at), with what the
    calibration predicted and measured for them. Without `timesteps` the scheduler spaces T steps its own way."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["tmpdiff.schedule/1", "tmpdiff.schedule/2", "tmpdiff.schedule/3"] = SCHEDULE_FORMAT_V1
    steps: int = Field(ge=1, le=MAX_STEPS, strict=True)
    scheduler: SchedulerRef | None = None
    precisions: list[str]
    timesteps: list[StrictInt] | None = None  # sampling order: strictly decreasing training timesteps, one per step
    time_embeddings: str | None = None  # /3: a time-embeddings file, relative to the schedule's directory
    reference: str = "fp32"
    target: dict = Field(default_factory=dict)
    predicted: Figures = Field(default_factory=Figures)
    measured: Figures = Field(default_factory=Figures)
    evaluations: int = Field(default=0, ge=0, strict=True)
    costs: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Schedule:
        if len(self.precisions) != self.steps:
            raise ValueError(f"{len(self.precisions)} precisions for {self.steps} steps")
        unknown = sorted({p for p in [*self.precisions, self.reference] if p not in PRECISIONS})
        if unknown:
            raise ValueError(f"unknown precision {', '.join(unknown)}; known: {', '.join(PRECISIONS)}")
        given = "format" in self.model_fields_set
        if self.timesteps is not None and given and self.format == SCHEDULE_FORMAT_V1:
            raise ValueError(f"timesteps need format {SCHEDULE_FORMAT} or later, not {SCHEDULE_FORMAT_V1}")
        if self.time_embeddings is not None and given and self.format != SCHEDULE_FORMAT_V3:
            raise ValueError(f"time_embeddings need format {SCHEDULE_FORMAT_V3}, not {self.format}")
        self.format = self.lowest_format()
        return self

    def lowest_format(self) -> str:
        """The lowest format version that holds this schedule."""
        if self.time_embeddings is not None:
            return SCHEDULE_FORMAT_V3
        return SCHEDULE_FORMAT if self.timesteps is not None else SCHEDULE_FORMAT_V1

    @field_validator("target")
    @classmethod
    def _guidance_is_a_number(cls, target: dict) -> dict:
        """The guidance scale a schedule was calibrated at is what a pipeline run is held to: a finite number."""
        scale = target.get("guidance_scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)
                                  or not math.isfinite(scale)):
            raise ValueError(f"target.guidance_scale must be a finite number, got {scale!r}")
        return target

    @field_validator("time_embeddings")
    @classmethod
    def _relative_file(cls, name: str | None) -> str | None:
        """A relative path that stays inside the schedule's directory (checked again, symlinks resolved, on load)."""
        if name is None:
            return None
        path = PurePosixPath(name.replace("\\", "/"))
        if not name or path.is_absolute() or ".." in path.parts or name.startswith("~"):
            raise ValueError(f"time_embeddings must be a path relative to the schedule's directory and inside it, "
                             f"got {name!r}")
        return name

    @field_validator("timesteps")
    @classmethod
    def _valid_timesteps(cls, timesteps: list[int] | None, info: ValidationInfo) -> list[int] | None:
        """One per step, a strictly decreasing subset of the training timesteps (of the named scheduler, if any)."""
        if timesteps is None:
            return None
        steps = info.data.get("steps")
        if steps is not None and len(timesteps) != steps:
            raise ValueError(f"{len(timesteps)} timesteps for {steps} steps")
        problem = timestep_problem(timesteps, train_timesteps(info.data.get("scheduler")))
        if problem:
            raise ValueError(problem)
        return timesteps

    @model_serializer(mode="wrap")
    def _lowest_version(self, handler):
        """Written as /1 without timesteps (the field left out), as /2 with them, as /3 with time embeddings."""
        data = handler(self)
        for optional in ("timesteps", "time_embeddings"):
            if data.get(optional) is None:
                data.pop(optional, None)
        data["format"] = self.lowest_format()
        return data

    @classmethod
    def uniform(cls, precision: str, steps: int) -> Schedule:
        return cls(steps=steps, precisions=[precision] * steps, reference=precision)


def train_timesteps(scheduler: SchedulerRef | None) -> int | None:
    """The named scheduler's training timestep count, when its config states it (else the runtime checks the range)."""
    if scheduler is None:
        return None
    value = scheduler.config.get("num_train_timesteps")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def timestep_problem(timesteps: list[int], train: int | None = None) -> str | None:
    """What is wrong with a custom timestep list (None if nothing): range (0..train-1), duplicates, order."""
    outside = [t for t in timesteps if t < 0 or (train is not None and t >= train)]
    if outside:
        known = "0 or more" if train is None else f"0..{train - 1}"
        return f"timestep {outside[0]} is outside the training timesteps ({known})"
    counts = Counter(timesteps)
    repeated = max((t for t, n in counts.items() if n > 1), default=None)
    if repeated is not None:
        return f"timestep {repeated} appears {counts[repeated]} times (each step needs its own)"
    for index, (before, after) in enumerate(zip(timesteps, timesteps[1:], strict=False), start=1):
        if after > before:
            return f"timesteps must be strictly decreasing (sampling order): step {index} has {after} after {before}"
    return None


def load_schedule(path: str | Path) -> Schedule:
    """Read and validate a schedule file; errors name the file and the first problems."""
    return read_model_file(Path(path), Schedule, "schedule", missing="schedule file")


def files_read(path: str | Path | None) -> list[Path]:
    """The files a command reading the schedule or plan at `path` reads: the file, and a /3 schedule's time-embeddings
    file (outputs are checked against both). A file that does not read as a schedule is reported when it is used."""
    if path is None:
        return []
    try:
        schedule = load_schedule(path)
    except TmpdiffError:  # a TMPQ-DM plan, or bad input that its command names when it reads it
        return [Path(path)]
    return [Path(path)] + ([Path(path).parent / schedule.time_embeddings] if schedule.time_embeddings else [])


def save_schedule(schedule: Schedule, path: str | Path) -> None:
    """Write in the lowest format version that holds the schedule (see the module docstring)."""
    write_json(path, schedule.model_dump(mode="json"))
