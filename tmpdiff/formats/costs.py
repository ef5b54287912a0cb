"""The step-cost table (format `tmpdiff.costs/1`): per precision, what one denoising step costs.

A table is either *measured* (`tmpdiff profile`: median step latency and spread in ms, on the device it ran on)
or *stated* (`tmpdiff costs`: per-precision cost ratios for a named target device, with the source of the
figures; no millisecond figures, nothing measured here). Tables written before `origin` existed are measured.
Calibration uses only the ratios between precisions, so both kinds drive it alike.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from tmpdiff.formats.atomic import read_model_file, write_json
from tmpdiff.formats.precisions import PRECISIONS

Origin = Literal["measured", "stated"]
_MEASURED_FIELDS = ("model_id", "backend", "backend_version", "batch", "warmup", "measured_at")


def _given_only(model: BaseModel, handler) -> dict:
    """Dump without the fields left at None (a stated table writes no empty millisecond or run fields)."""
    return {k: v for k, v in handler(model).items() if v is not None}


class PrecisionCost(BaseModel):
    """Measured: median_ms, p10_ms, p90_ms and repeats. Stated: ratio only (relative to the other precisions)."""

    model_config = ConfigDict(extra="forbid")
    median_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False, strict=True)  # "5" is refused
    p10_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False, strict=True)
    p90_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False, strict=True)
    repeats: int | None = Field(default=None, ge=1, strict=True)
    ratio: float | None = Field(default=None, gt=0, allow_inf_nan=False, strict=True)

    @model_validator(mode="after")
    def _one_kind(self) -> PrecisionCost:
        timed = (self.median_ms, self.p10_ms, self.p90_ms, self.repeats)
        if self.ratio is None and None in timed:
            raise ValueError("give median_ms, p10_ms, p90_ms and repeats (measured) or a ratio (stated)")
        if self.ratio is not None and any(v is not None for v in timed):
            raise ValueError("a stated ratio comes without measured millisecond figures")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        return _given_only(self, handler)

    @property
    def value(self) -> float:
        """The cost of one step: median ms (measured) or the stated ratio."""
        return self.ratio if self.ratio is not None else self.median_ms  # type: ignore[return-value]


MAX_COST_SPREAD = 1e6  # dearest / cheapest step cost: far beyond any two precisions of one device
# largest step cost (ms, or a ratio): 31 years a step; below it a schedule's cost (at most 10,000 steps) stays finite
MAX_STEP_COST = 1e12


class CostsTable(BaseModel):
    """Where the step costs come from (measured here, or stated for a device with a source) and what they are."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["tmpdiff.costs/1"] = "tmpdiff.costs/1"
    origin: Origin = "measured"
    device: str
    source: str | None = None  # stated: where the ratios come from
    model_id: str | None = None  # stated: None = any model
    backend: str | None = None
    backend_version: str | None = None
    batch: int | None = Field(default=None, ge=1, strict=True)
    threads: int | None = Field(default=None, ge=1, strict=True)
    warmup: int | None = Field(default=None, ge=0, strict=True)
    measured_at: str | None = None
    stated_at: str | None = None
    precisions: dict[str, PrecisionCost]

    @field_validator("precisions")
    @classmethod
    def _not_empty(cls, value: dict[str, PrecisionCost]) -> dict[str, PrecisionCost]:
        if not value:
            raise ValueError("no precision measured")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CostsTable:
        values = [p.value for p in self.precisions.values()]
        if max(values) > MAX_STEP_COST:  # e.g. 1e308: finite, yet a schedule's summed cost is not
            raise ValueError(f"a step cost of {max(values):g} is over {MAX_STEP_COST:g} (in ms or as a ratio): not a "
                             "device's figure")
        if max(values) > MAX_COST_SPREAD * min(values):
            # e.g. 1e308 and 1e-308: every figure finite, yet a speedup computed from them is not
            raise ValueError(f"the dearest precision ({max(values):g}) costs over {MAX_COST_SPREAD:g} times the "
                             f"cheapest ({min(values):g})")
        kinds = {p.ratio is not None for p in self.precisions.values()}
        unknown = sorted(set(self.precisions) - set(PRECISIONS))
        if self.origin == "measured":
            if unknown:
                raise ValueError(f"unknown precision {', '.join(unknown)}; known: {', '.join(PRECISIONS)}")
            missing = [name for name in _MEASURED_FIELDS if getattr(self, name) is None]
            if missing or kinds != {False}:
                raise ValueError(f"a measured table needs {', '.join(missing) or 'millisecond figures, not ratios'}")
            return self
        if not (self.source or "").strip() or not self.device.strip():
            raise ValueError("a stated table needs a device and a source")
        if unknown or kinds != {True}:
            raise ValueError(f"unknown precision {', '.join(unknown)}; known: {', '.join(PRECISIONS)}" if unknown
                             else "a stated table gives ratios, not millisecond figures")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        return _given_only(self, handler)

    @classmethod
    def stated(cls, device: str, ratios: dict[str, float], source: str, model_id: str | None = None) -> CostsTable:
        """A table of per-precision ratios stated for `device` (not measured here), with where they come from."""
        return cls(origin="stated", device=device, source=source, model_id=model_id,
                   stated_at=datetime.now(UTC).isoformat(timespec="seconds"),
                   precisions={name: PrecisionCost(ratio=ratio) for name, ratio in ratios.items()})

    @property
    def unit(self) -> str:
        """What the step costs are in: 'ms' (measured) or 'ratio' (stated)."""
        return "ms" if self.origin == "measured" else "ratio"

    def step_costs(self) -> dict[str, float]:
        """Cost of one step per precision, in `unit`; only the ratios between them matter to calibration."""
        return {name: cost.value for name, cost in self.precisions.items()}

    def relative(self, reference: str = "fp32") -> dict[str, float]:
        """Step cost of each precision divided by the reference's."""
        costs = self.step_costs()
        return {name: cost / costs[reference] for name, cost in costs.items()}

    def note(self) -> str:
        """One line naming where the costs come from, for every report that uses them."""
        if self.origin == "stated":
            return f"stated for {self.device}, source: {self.source}; not measured here"
        return f"measured on {self.device} ({self.backend}, batch {self.batch})"

    def provenance(self) -> dict:
        """Origin, device and source (stated) or how it was measured, plus the note: for JSON reports."""
        keys = ("source", "model_id") if self.origin == "stated" else ("backend", "batch", "model_id", "measured_at")
        return {"origin": self.origin, "device": self.device, **{k: getattr(self, k) for k in keys},
                "unit": self.unit, "note": self.note()}


def load_costs(path: str | Path) -> CostsTable:
    """Read and validate a costs file; errors name the file and the first problems."""
    return read_model_file(Path(path), CostsTable, "tmpdiff.costs/1 table", missing="costs file")


def save_costs(table: CostsTable, path: str | Path) -> None:
    write_json(path, table.model_dump(mode="json"))
