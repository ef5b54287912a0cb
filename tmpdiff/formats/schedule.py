"""`schedule.json` (format `tmpdiff.schedule/1`): which precision runs each denoising step."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tmpdiff.formats.atomic import read_model_file, write_json
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.precisions import PRECISIONS

SCHEDULE_FORMAT = "tmpdiff.schedule/1"


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
