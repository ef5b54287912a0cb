"""`schedule.json` (format `tmpdiff.schedule/1`): which precision runs each denoising step."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tmpdiff.atomic import read_model_file, write_json
from tmpdiff.errors import TmpdiffError
from tmpdiff.export.precisions import PRECISIONS

SCHEDULE_FORMAT = "tmpdiff.schedule/1"
# Highest precision first: a step whose output is not finite is re-run one place to the left.
PRECISION_ORDER = ("fp32", "fp16", "int8-sq", "int8", "fp8", "int4", "nvfp4")


class SchedulerRef(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")
    class_name: str
    config: dict


class Figures(BaseModel):
    model_config = ConfigDict(extra="allow")
    speedup: float | None = Field(default=None, allow_inf_nan=False)
    error: float | None = Field(default=None, allow_inf_nan=False)


class Schedule(BaseModel):
    """T precisions for T steps, with what the calibration predicted and measured for them."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["tmpdiff.schedule/1"] = SCHEDULE_FORMAT
    steps: int = Field(ge=1, le=10_000)
    scheduler: SchedulerRef | None = None
    precisions: list[str]
    reference: str = "fp32"
    target: dict = Field(default_factory=dict)
    predicted: Figures = Field(default_factory=Figures)
    measured: Figures = Field(default_factory=Figures)
    evaluations: int = Field(default=0, ge=0)
    costs: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Schedule:
        if len(self.precisions) != self.steps:
            raise ValueError(f"{len(self.precisions)} precisions for {self.steps} steps")
        unknown = sorted({p for p in [*self.precisions, self.reference] if p not in PRECISIONS})
        if unknown:
            raise ValueError(f"unknown precision {', '.join(unknown)}; known: {', '.join(PRECISIONS)}")
        return self

    @classmethod
    def uniform(cls, precision: str, steps: int) -> Schedule:
        return cls(steps=steps, precisions=[precision] * steps, reference=precision)


def load_schedule(path: str | Path) -> Schedule:
    """Read and validate a schedule file; errors name the file and the first problems."""
    path = Path(path)
    if not path.is_file():
        raise TmpdiffError("schedule file does not exist", path)
    return read_model_file(path, Schedule, f"{SCHEDULE_FORMAT} schedule")

def save_schedule(schedule: Schedule, path: str | Path) -> None:
    write_json(path, schedule.model_dump(mode="json"))


def check_against(schedule: Schedule, steps: int, available: list[str], source: str | Path) -> None:
    """The schedule fits this run: same step count, and every precision it names has an engine."""
    if schedule.steps != steps:
        raise TmpdiffError(f"schedule has {schedule.steps} steps but {steps} were requested", source)
    missing = sorted(set(schedule.precisions) - set(available))
    if missing:
        raise TmpdiffError(f"schedule uses {', '.join(missing)} but only {', '.join(available)} engines are built", source)


def fallback_for(precision: str, available: list[str]) -> str | None:
    """The next higher precision among `available` (None if `precision` is already the highest)."""
    index = PRECISION_ORDER.index(precision)
    for candidate in reversed(PRECISION_ORDER[:index]):
        if candidate in available:
            return candidate
    return None
