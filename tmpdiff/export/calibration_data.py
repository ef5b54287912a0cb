"""Calibration sets: the denoiser's own inputs, captured while sampling at the reference precision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tmpdiff.errors import TmpdiffError
from tmpdiff.export.quantize import CalibrationBatch, calibration_digest
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


class _Recorder:
    """A Denoiser that runs the torch model and keeps a copy of every input it was given."""

    def __init__(self, model: torch.nn.Module) -> None:
        from tmpdiff.runtime.sampler import TorchDenoiser

        self.inner = TorchDenoiser(model)
        self.batches: list[CalibrationBatch] = []

    def __call__(self, latent: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        self.batches.append({"hidden_states": latent.clone(), "timestep": timestep.clone(),
                             "class_labels": class_labels.clone()})
        return self.inner(latent, timestep, class_labels)


def sampled_calibration(model: torch.nn.Module, info, classes: Sequence[int], seeds: Sequence[int],
                        steps: int | None = None) -> CalibrationSet:
    """Inputs of every step of the trajectories of `classes` x `seeds` (cond and uncond halves), fp32 torch."""
    from tmpdiff.runtime.sampler import initial_noise, load_scheduler, sample

    if not classes or not seeds:
        raise TmpdiffError("calibration set is empty: give at least one class and one seed")
    steps = steps or info.default_steps
    recorder = _Recorder(model)
    labels = torch.tensor(list(classes), dtype=torch.int64)
    for seed in seeds:
        noise = initial_noise(len(labels), 1, info.image_size, seed)
        sample(recorder, load_scheduler(info.scheduler_dir), labels, noise, steps, info.guidance_scale,
               null_class=info.num_classes)
    return CalibrationSet(recorder.batches, {"source": "sampled trajectories, fp32 torch", "classes": list(classes),
                                             "seeds": list(seeds), "steps": steps,
                                             "guidance_scale": info.guidance_scale})


def random_calibration(adapter: DenoiserAdapter, batches: int = 8, batch: int = 2, seed: int = 0) -> CalibrationSet:
    """Random inputs that fit the adapter's specs, for models without a sampling recipe (tests, new classes)."""
    data = [adapter.sample_inputs(adapter.default_dims(batch), seed=seed + i) for i in range(batches)]
    return CalibrationSet(data, {"source": "random inputs", "seed": seed, "batch": batch})
