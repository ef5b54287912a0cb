"""Quantization calibration data from real sampling: the denoiser's inputs at every step of reference runs.

The torch model runs as an engine inside the one sampling loop; every call's bound inputs (cond and
uncond rows, scaled latents, timesteps, labels) are copied out as one calibration batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tmpdiff.engines.torch_engine import TorchEngine
from tmpdiff.export.calibration_data import CalibrationRecipe, CalibrationSet
from tmpdiff.formats.config_values import encode_non_finite
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import SamplingInfo
from tmpdiff.models.adapter import DenoiserAdapter
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise


def sampled_recipe(sampling: SamplingInfo, classes: Sequence[int], seeds: Sequence[int],
                   steps: int | None = None) -> CalibrationRecipe:
    """The recipe of `sampled_calibration` (checked now, captured only when an export needs the data)."""
    classes, seeds = list(classes), list(seeds)
    if not classes or not seeds:
        raise TmpdiffError("calibration set is empty: give at least one class and one seed")
    steps = steps or sampling.default_steps
    description = {"source": "sampled trajectories, fp32 torch", "classes": classes, "seeds": seeds, "steps": steps,
                   "guidance_scale": sampling.guidance_scale, "scheduler": sampling.scheduler_class,
                   "scheduler_config": encode_non_finite(sampling.scheduler_config)}
    return CalibrationRecipe(description, lambda model, adapter: sampled_calibration(model, adapter, sampling, classes,
                                                                                      seeds, steps))


def sampled_calibration(model: torch.nn.Module, adapter: DenoiserAdapter, sampling: SamplingInfo, classes: Sequence[int],
                        seeds: Sequence[int], steps: int | None = None) -> CalibrationSet:
    """Inputs of every step of the trajectories of `classes` x `seeds`, sampled by the fp32 torch model."""
    if not classes or not seeds:
        raise TmpdiffError("calibration set is empty: give at least one class and one seed")
    steps = steps or sampling.default_steps
    batches: list[dict[str, torch.Tensor]] = []
    engine = TorchEngine.for_model(model, adapter, on_inputs=batches.append)
    runner = ScheduledRunner({"fp32": engine}, len(classes), sampling.channels, sampling.image_size,
                             sampling.guidance_scale, sampling.null_class, sampling.num_classes, nan_guard=False)
    labels = torch.tensor(list(classes), dtype=torch.int64)
    for seed in seeds:
        noise = initial_noise(len(labels), sampling.channels, sampling.image_size, seed)
        runner.sample(sampling_scheduler(sampling), labels, noise, ["fp32"] * steps)
    return CalibrationSet(batches, {"source": "sampled trajectories, fp32 torch", "classes": list(classes),
                                    "seeds": list(seeds), "steps": steps, "guidance_scale": sampling.guidance_scale})
