"""MTEO distillation: per-step, per-block time embeddings (or per-step timestep shifts) for an N-step solver.

The backbone is frozen; only the (steps, slots, dim) embedding table (initialised from the model's own embedding
of each step's timestep) or the (steps,) shift vector (initialised at 0) is optimised, with Adam and a cosine
learning rate, so that the N-step trajectory from a noise matches the many-step fp32 reference from the same
noise: at the student's timesteps (`trajectory`: mean squared error over the N latents) or at the sample only
(`final`). Training noises come from `train_seed`, the held-out noises that choose between the losses from
`validation_seed`; evaluation uses other seeds (scripts/bench_mteo.py: seed 0).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tmpdiff.calibration.few_step import (
    Conditioning,
    FewStepSampler,
    make_scheduler,
    reference_states,
    solver_timesteps,
)
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.time_embeddings import Kind, LossRecord, TimeEmbeddingsInfo
from tmpdiff.models.time_embeddings import own_embeddings
from tmpdiff.runtime.runner import initial_noise

Loss = Literal["trajectory", "final"]
LEARNING_RATE: dict[str, float] = {"mteo": 3e-2, "timestep-shift": 2.0}  # shift: in training-timestep units


@dataclass(frozen=True)
class DistillConfig:
    """What to distill and on which data."""

    solver: str
    steps: int
    kind: Kind = "mteo"
    iterations: int = 40
    batch: int = 8
    train_samples: int = 32
    validation_samples: int = 16
    reference_steps: int = 50
    train_seed: int = 1000
    validation_seed: int = 2000
    lr: float | None = None


@dataclass
class DistillData:
    """Noises, labels and reference latents of the training and validation sets (shared between runs)."""

    labels: torch.Tensor
    noise: torch.Tensor
    reference: torch.Tensor  # (N, K, C, H, W)
    val_labels: torch.Tensor
    val_noise: torch.Tensor
    val_reference: torch.Tensor


@dataclass
class DistillResult:
    tensor: torch.Tensor
    record: LossRecord
    losses: list[float] = field(default_factory=list)


@dataclass
class Distiller:
    """A frozen model, what it is conditioned on (classes or encoded prompts) and its sampling settings."""

    model: torch.nn.Module
    scheduler_config: dict[str, Any]
    guidance_scale: float
    conditioning: Conditioning
    channels: int
    image_size: int
    step_models: Sequence[torch.nn.Module] | None = None  # per-step models (quantization-aware); default `model`

    def __post_init__(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._samplers: dict[int, FewStepSampler] = {}

    def timesteps(self, solver: str, steps: int) -> list[int]:
        return solver_timesteps(make_scheduler(solver, self.scheduler_config), steps)

    def sampler(self, steps: int) -> FewStepSampler:
        """The N-step sampler (one per N, its hooks' slots probed once)."""
        if steps not in self._samplers:
            models = list(self.step_models) if self.step_models is not None else self.model
            self._samplers[steps] = FewStepSampler(models, steps, self.guidance_scale, self.conditioning, self.channels)
        return self._samplers[steps]

    def data(self, cfg: DistillConfig) -> DistillData:
        """Training and validation noises (one generator seed each), conditions cycling over the classes or prompts,
        references."""
        timesteps = self.timesteps(cfg.solver, cfg.steps)

        def one(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            labels = torch.arange(count) % self.conditioning.count
            noise = initial_noise(count, self.channels, self.image_size, seed)
            ref = reference_states(self.model, self.scheduler_config, timesteps, labels, noise,
                                   guidance_scale=self.guidance_scale, conditioning=self.conditioning,
                                   channels=self.channels, reference_steps=cfg.reference_steps)
            return labels, noise, ref

        return DistillData(*one(cfg.train_samples, cfg.train_seed), *one(cfg.validation_samples, cfg.validation_seed))

    def initial(self, cfg: DistillConfig) -> torch.Tensor:
        """Embeddings the model itself gives each step (mteo), or zero shifts."""
        if cfg.kind == "mteo":
            return own_embeddings(self.model, self.timesteps(cfg.solver, cfg.steps))
        return torch.zeros(cfg.steps)

    def states(self, cfg: DistillConfig, params: torch.Tensor, labels: torch.Tensor,
               noise: torch.Tensor) -> list[torch.Tensor]:
        key = "embeddings" if cfg.kind == "mteo" else "shifts"
        return self.sampler(cfg.steps).sample_states(make_scheduler(cfg.solver, self.scheduler_config), labels, noise,
                                                     **{key: params})

    def loss(self, cfg: DistillConfig, loss: Loss, params: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
             reference: torch.Tensor) -> torch.Tensor:
        states = self.states(cfg, params, labels, noise)
        if loss == "final":
            return (states[-1] - reference[-1]).pow(2).mean()
        return torch.stack([(s - r).pow(2).mean() for s, r in zip(states, reference, strict=True)]).mean()

    @torch.no_grad()
    def evaluate(self, cfg: DistillConfig, loss: Loss, params: torch.Tensor, labels: torch.Tensor,
                 noise: torch.Tensor, reference: torch.Tensor) -> float:
        """The loss over a whole set, in batches weighted by size."""
        total = 0.0
        for start in range(0, len(labels), 32):
            part = slice(start, start + 32)
            total += float(self.loss(cfg, loss, params, labels[part], noise[part], reference[:, part])) * len(labels[part])
        return total / len(labels)

    def distill(self, cfg: DistillConfig, loss: Loss, data: DistillData,
                on_iteration: Callable[[int, float], None] | None = None) -> DistillResult:
        """Optimise the table (or shifts) from its initial value; deterministic for the config's seeds."""
        if cfg.iterations < 0 or cfg.batch < 1:
            raise TmpdiffError("iterations must be >= 0 and batch >= 1")
        start_time, start_cpu = time.perf_counter(), time.process_time()
        params = self.initial(cfg).clone().requires_grad_(True)
        lr = cfg.lr if cfg.lr is not None else LEARNING_RATE[cfg.kind]
        optimizer = torch.optim.Adam([params], lr=lr)
        # cosine decay (computed in float32 torch, as the committed results were)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * i / max(cfg.iterations, 1)))).item())
        generator = torch.Generator().manual_seed(cfg.train_seed)
        initial = self.evaluate(cfg, loss, params, data.labels, data.noise, data.reference)
        losses, order = [], torch.empty(0, dtype=torch.long)
        for iteration in range(cfg.iterations):
            if len(order) < cfg.batch:
                order = torch.randperm(len(data.labels), generator=generator)
            pick, order = order[: cfg.batch], order[cfg.batch :]
            optimizer.zero_grad()
            value = self.loss(cfg, loss, params, data.labels[pick], data.noise[pick], data.reference[:, pick])
            value.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(value.detach()))
            if on_iteration is not None:
                on_iteration(iteration, losses[-1])
        final = self.evaluate(cfg, loss, params, data.labels, data.noise, data.reference)
        validation = self.evaluate(cfg, "final", params, data.val_labels, data.val_noise, data.val_reference)
        record = LossRecord(loss=loss, initial=initial, final=final, validation_mse=validation,
                            seconds=round(time.perf_counter() - start_time, 2),
                            cpu_seconds=round(time.process_time() - start_cpu, 2))
        return DistillResult(params.detach().clone(), record, losses)


def embeddings_info(distiller: Distiller, cfg: DistillConfig, name: str, tensor: torch.Tensor, loss: Loss,
                    runs: list[LossRecord], model_sha256: str | None = None, *, kept: str = "learned",
                    initial_validation_mse: float | None = None) -> TimeEmbeddingsInfo:
    """The record written beside a distilled table (or shift vector): model (name and content hash, as a build's
    manifest records it), solver, timesteps, slots, training, and whether the tensor is the best run's (`kept`
    "learned") or the initial one's ("initial": no run beat it on the held-out set)."""
    mteo = cfg.kind == "mteo"
    return TimeEmbeddingsInfo(
        kind=cfg.kind, model=name, model_sha256=model_sha256, model_parameters=model_parameters(distiller.model), solver=cfg.solver,
        steps=cfg.steps, timesteps=distiller.timesteps(cfg.solver, cfg.steps),
        slots=distiller.sampler(cfg.steps).slots if mteo else [], dim=int(tensor.shape[-1]) if mteo else 0,
        trained_parameters=int(tensor.numel()), guidance_scale=distiller.guidance_scale,
        reference_steps=cfg.reference_steps, train_seed=cfg.train_seed, train_samples=cfg.train_samples,
        validation_seed=cfg.validation_seed, iterations=cfg.iterations, loss=loss, runs=runs, kept=kept,
        initial_validation_mse=initial_validation_mse)


def model_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
