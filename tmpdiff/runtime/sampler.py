"""Class-conditional sampling loop around a diffusers scheduler.

The denoiser is any callable (torch module wrapper or engine) mapping
(latent, timestep, class_labels) -> noise prediction; the scheduler maths is diffusers'.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from tmpdiff.atomic import read_json_object
from tmpdiff.errors import TmpdiffError


class Denoiser(Protocol):
    def __call__(self, latent: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor: ...


@dataclass
class StepRecord:
    """One denoising step as it ran."""

    index: int
    timestep: int
    seconds: float
    label: str = ""


@dataclass
class SampleResult:
    latents: torch.Tensor
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


def load_scheduler(scheduler_dir: str | Path):
    """A fresh diffusers scheduler from a `scheduler_config.json` directory (class taken from the config)."""
    import diffusers

    scheduler_dir = Path(scheduler_dir)
    config_path = scheduler_dir / "scheduler_config.json"
    if not config_path.is_file():
        raise TmpdiffError("no scheduler_config.json", scheduler_dir)
    config = read_json_object(config_path)
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise TmpdiffError(f"unknown scheduler class {config.get('_class_name')!r}", config_path)
    return cls.from_config(config)


def initial_noise(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Deterministic starting latent for a seed (CPU generator, so it is identical on every machine)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((batch, channels, size, size), generator=gen, dtype=torch.float32)


def guided(eps: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance from one batched call whose first half is conditional, second half unconditional."""
    eps_cond, eps_uncond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler,
    class_labels: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance_scale: float,
    null_class: int,
    on_step: Callable[[StepRecord], None] | None = None,
) -> SampleResult:
    """Run `steps` denoising steps from `noise`; classifier-free guidance batches cond/uncond in one call."""
    if steps < 1:
        raise TmpdiffError(f"steps must be >= 1, got {steps}")
    if noise.shape[0] != class_labels.shape[0]:
        raise TmpdiffError(f"{noise.shape[0]} noise latents for {class_labels.shape[0]} class labels")
    scheduler.set_timesteps(steps)
    latent = noise * scheduler.init_noise_sigma
    use_cfg = guidance_scale != 1.0
    labels = torch.cat([class_labels, torch.full_like(class_labels, null_class)]) if use_cfg else class_labels
    result = SampleResult(latents=latent)
    for index, t in enumerate(scheduler.timesteps):
        start = time.perf_counter()
        model_in = torch.cat([latent, latent]) if use_cfg else latent
        model_in = scheduler.scale_model_input(model_in, t)
        timestep = torch.full((model_in.shape[0],), float(t), dtype=torch.float32)
        eps = denoiser(model_in, timestep, labels)
        if use_cfg:
            eps = guided(eps, guidance_scale)
        latent = scheduler.step(eps, t, latent).prev_sample
        record = StepRecord(index=index, timestep=int(t), seconds=time.perf_counter() - start)
        result.steps.append(record)
        if on_step is not None:
            on_step(record)
    result.latents = latent
    return result


class TorchDenoiser:
    """Adapts a diffusers DiT-style module to the Denoiser call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, latent: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        out = self.model(latent, timestep=timestep, class_labels=class_labels, return_dict=False)[0]
        return out[:, : latent.shape[1]]
