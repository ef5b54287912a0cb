"""Per-layer costs (format `tmpdiff.layer-costs/1`): what each quantizable layer costs at each precision.

Measured on the engines (ONNX Runtime's profiler: per-node durations of each precision's engine, nodes mapped to the
layer whose ONNX name scope they carry). A layer configuration (one precision per layer) is predicted to cost
`rest_ms[base] + sum(layer.ms[precision])`: the nodes no layer owns (attention matmuls, softmax, norms, embeddings)
taken from the base precision's engine. BitOPs (MACs x weight bits x activation bits, per sample) are reported
beside, as TMPQ-DM's constraint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from tmpdiff.formats.atomic import read_model_file, write_json
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.precisions import PRECISIONS

LAYER_COSTS_FORMAT = "tmpdiff.layer-costs/1"

# (weight bits, activation bits) of each precision, for BitOPs; int4 is W4A16 (modelopt's INT4 AWQ).
BITS: dict[str, tuple[int, int]] = {"fp32": (32, 32), "fp16": (16, 16), "int8": (8, 8), "int8-sq": (8, 8),
                                    "fp8": (8, 8), "int4": (4, 16), "nvfp4": (4, 4)}

StrictNumber = Annotated[float, Field(strict=True)]  # an int or float, never a string


class LayerCost(BaseModel):
    """One quantizable layer (a Linear/Conv module name): its MACs per sample and its cost at each precision."""

    model_config = ConfigDict(extra="forbid")
    name: str
    macs: int = Field(ge=0, strict=True)  # multiply-accumulates per sample (one latent row)
    ms: dict[str, StrictNumber]  # per precision: median ms of this layer's nodes in one engine call ("5" refused)
    nodes: dict[str, StrictInt] = Field(default_factory=dict)  # per precision: how many profiled nodes it owns

    def bitops(self, precision: str) -> float:
        weight_bits, act_bits = BITS[precision]
        return float(self.macs) * weight_bits * act_bits


class LayerCostsTable(BaseModel):
    """Per-layer costs of one build on one device; `step_ms` is each engine's whole profiled call, for checking."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["tmpdiff.layer-costs/1"] = LAYER_COSTS_FORMAT
    model_id: str
    backend: str
    backend_version: str
    device: str
    batch: int = Field(ge=1, strict=True)  # rows per engine call (classifier-free guidance doubles the samples)
    repeats: int = Field(ge=1, strict=True)
    threads: int | None = Field(default=None, ge=1, strict=True)  # intra-op threads per session (None: the backend's)
    precisions: list[str]
    base: str = "fp32"  # precision whose unattributed nodes (`rest_ms`) every configuration pays
    # set in the search's view of a 16-bit build's table (`unquantized_as`): the 16-bit engine whose figures the "fp32"
    # (unquantized layers) column holds; never written by layer-costs
    unquantized_engine: str | None = None
    layers: list[LayerCost]
    rest_ms: dict[str, float]  # per precision: nodes no layer owns
    step_ms: dict[str, float]  # per precision: median profiled duration of a whole engine call
    measured_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    load_average: list[float] = Field(default_factory=list)  # 1-minute load before and after (other jobs' share)

    @model_validator(mode="after")
    def _consistent(self) -> LayerCostsTable:
        unknown = sorted({p for p in self.precisions if p not in PRECISIONS or p not in BITS})
        if unknown:
            raise ValueError(f"unknown precision {', '.join(unknown)}")
        if self.unquantized_engine is not None and (BITS.get(self.unquantized_engine, (0, 0))[0] != 16
                                                    or "fp32" not in self.precisions):
            raise ValueError(f"unquantized_engine {self.unquantized_engine!r} must be a 16-bit precision standing for "
                             "the fp32 column")
        if self.base not in self.precisions:
            raise ValueError(f"base precision {self.base} is not among {self.precisions}")
        if self.base not in self.rest_ms:
            raise ValueError(f"rest_ms has no figure for the base precision {self.base}")
        figures = [*self.rest_ms.values(), *self.step_ms.values(), *(v for layer in self.layers for v in layer.ms.values())]
        if not all(math.isfinite(v) and v >= 0 for v in figures):
            raise ValueError("every millisecond figure must be a finite number >= 0")
        for layer in self.layers:
            missing = [p for p in self.precisions if p not in layer.ms]
            if missing:
                raise ValueError(f"layer {layer.name} has no cost for {', '.join(missing)}")
        if len({layer.name for layer in self.layers}) != len(self.layers):
            raise ValueError("a layer is listed twice")
        # every prediction is a divisor (speedups over the fp32 reference, the reference over a plan's cost)
        cheapest = self.rest_ms[self.base] + sum(min(layer.ms[p] for p in self.precisions) for layer in self.layers)
        if cheapest <= 0:
            raise ValueError(f"a layer configuration would cost 0 ms (rest_ms of {self.base} and each layer's cheapest "
                             "figure are all 0): no speedup can be measured against such a table")
        return self

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def config_ms(self, config: Sequence[str]) -> float:
        """Predicted ms of one engine call of a layer configuration (one precision per layer, in table order)."""
        self._check(config)
        return self.rest_ms[self.base] + sum(layer.ms[p] for layer, p in zip(self.layers, config, strict=True))

    def config_bitops(self, config: Sequence[str]) -> float:
        """BitOPs per sample of one denoiser call of a layer configuration (unquantized layers at the width of the
        engine they run on)."""
        self._check(config)
        return sum(layer.bitops(self.engine_of(p)) for layer, p in zip(self.layers, config, strict=True))

    def engine_of(self, precision: str) -> str:
        """The engine precision a configuration's entry runs on: "fp32" (unquantized) on a 16-bit build's engine."""
        return self.unquantized_engine if precision == "fp32" and self.unquantized_engine is not None else precision

    def unquantized_as(self, engine: str) -> LayerCostsTable:
        """This table with the 16-bit `engine`'s figures as the "fp32" (unquantized layers) column: a build exported
        from a 16-bit model has no fp32 engine, and its unquantized layers run at 16 bits."""
        if engine not in self.precisions or "fp32" in self.precisions:
            raise TmpdiffError(f"cannot stand {engine} for the unquantized column of a table of {self.precisions}")

        def renamed(values: Mapping) -> dict:
            return {("fp32" if p == engine else p): v for p, v in values.items()}

        return self.model_copy(update={
            "precisions": ["fp32" if p == engine else p for p in self.precisions],
            "base": "fp32" if self.base == engine else self.base, "unquantized_engine": engine,
            "layers": [layer.model_copy(update={"ms": renamed(layer.ms), "nodes": renamed(layer.nodes)})
                       for layer in self.layers],
            "rest_ms": renamed(self.rest_ms), "step_ms": renamed(self.step_ms)})

    def uniform(self, precision: str) -> list[str]:
        return [precision] * len(self.layers)

    def _check(self, config: Sequence[str]) -> None:
        if len(config) != len(self.layers):
            raise TmpdiffError(f"a layer configuration of {len(config)} precisions for {len(self.layers)} layers")
        unknown = sorted(set(config) - set(self.precisions))
        if unknown:
            raise TmpdiffError(f"no layer costs for {', '.join(unknown)} (the table has {', '.join(self.precisions)})")

    def as_dict(self) -> Mapping[str, LayerCost]:
        return {layer.name: layer for layer in self.layers}


def load_layer_costs(path: str | Path) -> LayerCostsTable:
    return read_model_file(Path(path), LayerCostsTable, "layer costs table", missing="layer costs file")


def save_layer_costs(table: LayerCostsTable, path: str | Path) -> None:
    write_json(path, table.model_dump(mode="json"))
