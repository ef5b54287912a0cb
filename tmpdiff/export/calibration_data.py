"""Calibration sets for quantization: batches of denoiser inputs and where they came from.

Sampled sets (the denoiser's own inputs along real trajectories) are captured by the runtime
(`tmpdiff.runtime.capture`) and handed to export; random inputs are for models without a recipe."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tmpdiff.export.quantize import CalibrationBatch, calibration_digest
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.models.adapter import DenoiserAdapter


@dataclass
class CalibrationSet:
    """Batches of denoiser inputs plus a description recorded in the manifest."""

    batches: list[CalibrationBatch]
    description: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.batches:
            raise TmpdiffError("calibration set is empty")
        self.description = {**self.description, "batches": len(self.batches), "digest": calibration_digest(self.batches)}


@dataclass(frozen=True)
class CalibrationRecipe:
    """How a calibration set is made, without making it: `description` (JSON-able, deterministic: source, seeds,
    classes, steps...) keys the export cache, so an up-to-date export neither loads the model nor captures data;
    `capture` makes the set when a precision is actually (re)exported."""

    description: dict
    capture: Callable[[torch.nn.Module, DenoiserAdapter], CalibrationSet]


def random_recipe(batches: int = 8, batch: int = 2, seed: int = 0) -> CalibrationRecipe:
    """Random inputs that fit the adapter's specs (models without a sampling recipe)."""
    return CalibrationRecipe({"source": "random inputs", "seed": seed, "batch": batch, "batches": batches},
                             lambda model, adapter: random_calibration(adapter, batches, batch, seed))


def random_calibration(adapter: DenoiserAdapter, batches: int = 8, batch: int = 2, seed: int = 0) -> CalibrationSet:
    """Random inputs that fit the adapter's specs, for models without a sampling recipe (tests, new classes)."""
    data = [adapter.sample_inputs(adapter.default_dims(batch), seed=seed + i) for i in range(batches)]
    return CalibrationSet(data, {"source": "random inputs", "seed": seed, "batch": batch})
