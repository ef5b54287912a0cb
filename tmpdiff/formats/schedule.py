"""`schedule.json` (format `tmpdiff.schedule/1`): which precision runs each denoising step."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_serializer, model_validator

from tmpdiff.formats.atomic import read_model_file, write_json
from tmpdiff.formats.config_values import decode_non_finite, encode_non_finite
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.precisions import PRECISIONS

SCHEDULE_FORMAT = "tmpdiff.schedule/1"


class SchedulerRef(BaseModel):
    """The diffusers scheduler a schedule was calibrated with (non-finite config values as "inf"/"-inf"/"nan")."""

    model_config = ConfigDict(extra="forbid")
    class_name: str
    config: dict

    @field_validator("config", mode="before")
    @classmethod
    def _read_non_finite(cls, config: dict) -> dict:
        return decode_non_finite(config) if isinstance(config, dict) else config

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
    """T precisions for T steps, with what the calibration predicted and measured for them."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["tmpdiff.schedule/1"] = SCHEDULE_FORMAT
    steps: int = Field(ge=1, le=10_000, strict=True)
    scheduler: SchedulerRef | None = None
    precisions: list[str]
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
