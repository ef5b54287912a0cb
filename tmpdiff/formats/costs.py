"""The latency table (format `tmpdiff.costs/1`): per precision, median step latency and spread."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tmpdiff.formats.atomic import read_model_file, write_json
from tmpdiff.formats.errors import TmpdiffError


class PrecisionCost(BaseModel):
    model_config = ConfigDict(extra="forbid")
    median_ms: float = Field(gt=0, allow_inf_nan=False)
    p10_ms: float = Field(gt=0, allow_inf_nan=False)
    p90_ms: float = Field(gt=0, allow_inf_nan=False)
    repeats: int = Field(ge=1)


class CostsTable(BaseModel):
    """Where and how the latencies were measured, and what they were."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["tmpdiff.costs/1"] = "tmpdiff.costs/1"
    model_id: str
    backend: str
    backend_version: str
    device: str
    batch: int = Field(ge=1)
    threads: int | None = None
    warmup: int = Field(ge=0)
    measured_at: str
    precisions: dict[str, PrecisionCost]

    @field_validator("precisions")
    @classmethod
    def _not_empty(cls, value: dict[str, PrecisionCost]) -> dict[str, PrecisionCost]:
        if not value:
            raise ValueError("no precision measured")
        return value

    def relative(self, reference: str = "fp32") -> dict[str, float]:
        """Median latency of each precision divided by the reference's."""
        base = self.precisions[reference].median_ms
        return {name: cost.median_ms / base for name, cost in self.precisions.items()}


def load_costs(path: str | Path) -> CostsTable:
    """Read and validate a costs file; errors name the file and the first problems."""
    path = Path(path)
    if not path.is_file():
        raise TmpdiffError("costs file does not exist", path)
    return read_model_file(path, CostsTable, "tmpdiff.costs/1 table")

def save_costs(table: CostsTable, path: str | Path) -> None:
    write_json(path, table.model_dump(mode="json"))
