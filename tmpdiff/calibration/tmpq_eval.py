"""Evaluating TMPQ-DM candidates: the super-network (torch fake quant) sampled by the runtime's loop at chosen timesteps.

Each distinct layer configuration of a candidate is one engine of the runner (a `TorchEngine` over the super-network
that selects its configuration before every call), so a per-step plan runs exactly as engines would switch. Quality:
reference-free (the bundled classifier's confidence in the class asked for, and its accuracy), plus the distance to
the fp32 reference sampled with the reference step count (SSIM, PSNR, relative latent error), reported beside since
fewer steps move the trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from tmpdiff.engines.torch_engine import TorchEngine
from tmpdiff.eval.classifier import DigitClassifier
from tmpdiff.eval.metrics import image_metrics, to_images
from tmpdiff.export.half_convolutions import fp32_compute
from tmpdiff.export.supernet import SuperNet
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import SamplingInfo
from tmpdiff.models.adapter import DenoiserAdapter, model_dtype
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise

METRICS = ("confidence", "accuracy", "ssim", "latent")


class CandidateEvaluator(Protocol):
    """Samples a candidate plan on a fixed sample set and scores the result (class-conditional: `PlanEvaluator`;
    text-to-image: `tmpq_pipeline.PipelinePlanEvaluator`)."""

    runs: int

    def sample(self, configs: Sequence[Sequence[str]], timesteps: Sequence[int] | None) -> torch.Tensor:
        """Final latents: `configs[i]` (a precision per layer) runs step i, at `timesteps[i]` if given."""
        ...

    def quality(self, latents: torch.Tensor) -> dict[str, float]:
        """At least `confidence`, `accuracy`, `ssim`, `psnr`, `latent_error` (what `fitness_of` reads)."""
        ...


def config_engines(supernet: SuperNet, configs: Sequence[Sequence[str]],
                   adapter: DenoiserAdapter) -> tuple[dict[str, ConfigEngine], list[str]]:
    """One engine per distinct layer configuration (`config0`, ...) and the engine each step runs."""
    distinct = list(dict.fromkeys(tuple(c) for c in configs))
    engines = {f"config{i}": ConfigEngine(supernet, c, adapter, f"config{i}") for i, c in enumerate(distinct)}
    return engines, [f"config{distinct.index(tuple(c))}" for c in configs]


class ConfigEngine(TorchEngine):
    """The super-network as an engine at one layer configuration (selected before each call)."""

    def __init__(self, supernet: SuperNet, config: Sequence[str], adapter: DenoiserAdapter, label: str) -> None:
        # a 16-bit super-network (the build's model was loaded so) computes in it; inputs and outputs stay float32
        module = adapter.export_module(supernet.model, model_dtype(supernet.model))
        super().__init__(module, adapter.input_specs(), adapter.output_specs(), label)
        self.supernet, self.layer_config = supernet, list(config)

    def run(self, stream) -> None:
        self.supernet.select(self.layer_config)
        with fp32_compute():  # its fp16 CPU convolutions and GEMMs (`half_convolutions`); fp32 models unchanged
            super().run(stream)


@dataclass
class PlanEvaluator:
    """Samples (timesteps, per-step layer configurations) on a fixed set of classes x seeds and scores them."""

    supernet: SuperNet
    adapter: DenoiserAdapter
    sampling: SamplingInfo
    classifier_dir: Path
    classes: Sequence[int]
    seeds: Sequence[int]
    reference_steps: int = 20
    runs: int = field(default=0, init=False)  # candidate samplings (the reference excluded)

    def __post_init__(self) -> None:
        if not self.classes or not self.seeds:
            raise TmpdiffError("the evaluation set is empty: give at least one class and one seed")
        self.labels = torch.tensor([c for _ in self.seeds for c in self.classes], dtype=torch.int64)
        self.noise = torch.cat([initial_noise(len(self.classes), self.sampling.channels, self.sampling.image_size, s)
                                for s in self.seeds])
        self.classifier = DigitClassifier.load(self.classifier_dir).eval()
        fp32 = self.supernet.uniform("fp32")
        self.reference = self.sample([fp32] * self.reference_steps, None)
        self.reference_images = to_images(self.reference)
        self.runs = 0

    def sample(self, configs: Sequence[Sequence[str]], timesteps: Sequence[int] | None) -> torch.Tensor:
        """Final latents of one plan: `configs[i]` (a layer configuration) runs step i, at `timesteps[i]` if given."""
        engines, labels = config_engines(self.supernet, configs, self.adapter)
        runner = ScheduledRunner(engines, len(self.labels), self.sampling.channels, self.sampling.image_size,
                                 self.sampling.guidance_scale, self.sampling.null_class, self.sampling.num_classes,
                                 nan_guard=False, nvtx=False)
        latents = runner.sample(sampling_scheduler(self.sampling), self.labels, self.noise, labels,
                                timesteps=None if timesteps is None else list(timesteps)).latents
        self.runs += 1
        return latents

    @torch.no_grad()
    def quality(self, latents: torch.Tensor) -> dict[str, float]:
        """Classifier confidence (mean probability of the asked class) and accuracy; SSIM, PSNR, latent error vs fp32."""
        logits = self.classifier(latents.float().clamp(-1, 1))
        probs = logits.softmax(dim=1)
        confidence = probs[torch.arange(len(self.labels)), self.labels]
        ssim, psnr = image_metrics(to_images(latents), self.reference_images)
        return {"confidence": float(confidence.mean()), "accuracy": float((logits.argmax(1) == self.labels).float().mean()),
                "ssim": ssim, "psnr": psnr, "latent_error": relative_latent_error(latents, self.reference)}


def relative_latent_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of ||x - x_ref||^2 / ||x_ref||^2."""
    diff = (latents - reference).flatten(1).pow(2).sum(1)
    return float((diff / reference.flatten(1).pow(2).sum(1).clamp_min(1e-12)).mean())


def fitness_of(quality: dict[str, float], metric: str) -> float:
    """The scalar the search minimises for a metric name."""
    if metric == "confidence":
        return 1.0 - quality["confidence"]
    if metric == "accuracy":  # ties broken by confidence
        return 1.0 - quality["accuracy"] + 1e-3 * (1.0 - quality["confidence"])
    if metric == "ssim":
        return 1.0 - quality["ssim"]
    if metric == "latent":
        return quality["latent_error"]
    raise TmpdiffError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
