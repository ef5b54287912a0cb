"""Few-step sampling on the torch model with learned time conditioning, differentiable, plus its reference.

`sample_states` is the runtime's loop (`runtime/runner.py`: scale, one batched cond/uncond call, guidance, the
diffusers scheduler's `step`) written on plain tensors so gradients reach the per-step embeddings (MTEO) or the
per-step timestep shifts (Time-tuner-style baseline). What a sample is conditioned on is an index into a
`Conditioning`: a class label, or a prompt the pipeline's text encoder encoded once (the diffusers text-to-image
pipelines' loop, with the negative prompt as the unconditional half). `reference_states` runs a many-step fp32 DPM-Solver++ whose
timesteps include the student's, and records the latents at the student's timesteps and the final sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.models.time_embeddings import EmbeddingOverride
from tmpdiff.runtime.runner import guided


class Solver(StrEnum):
    dpmsolver = "dpmsolver++"
    ddim = "ddim"


def make_scheduler(solver: Solver | str, config: dict[str, Any]):
    """The solver on the model's noise process. DPM-Solver++ 2M as the model ships it; DDIM with 'trailing'
    spacing (its default 'leading'/'linspace' would spend the last step at t = 0), thresholding as the model's config
    says and no clipping unless it says so (DDIM's own default clips x0 to [-1, 1]: right for pixels, ruinous for a
    latent model's x0, whose values go well beyond)."""
    import diffusers

    solver = Solver(solver)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if solver is Solver.dpmsolver:
        return diffusers.DPMSolverMultistepScheduler.from_config({**config, "algorithm_type": "dpmsolver++"})
    return diffusers.DDIMScheduler.from_config({**config, "timestep_spacing": "trailing",
                                                "clip_sample": bool(config.get("clip_sample", False))})


def solver_timesteps(scheduler, steps: int) -> list[int]:
    """The N timesteps the solver samples at."""
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


class Conditioning(Protocol):
    count: int  # how many conditions (classes or prompts) an index may pick

    def kwargs(self, index: torch.Tensor, guided: bool) -> dict[str, Any]:
        """The denoiser's conditioning arguments for samples `index`: conditional rows, then unconditional if guided."""
        ...


@dataclass(frozen=True)
class ClassConditioning:
    """Class labels; the unconditional half asks for the null class."""

    count: int
    null_class: int

    def kwargs(self, index: torch.Tensor, guided: bool) -> dict[str, Any]:
        return {"class_labels": torch.cat([index, torch.full_like(index, self.null_class)]) if guided else index}


@dataclass(frozen=True)
class PromptConditioning:
    """Prompts encoded once: (P, L, D) embeddings and (P, L) masks; the unconditional half is the negative prompt's."""

    embeds: torch.Tensor
    mask: torch.Tensor
    negative_embeds: torch.Tensor  # (L, D)
    negative_mask: torch.Tensor  # (L,)

    @property
    def count(self) -> int:
        return int(self.embeds.shape[0])

    def kwargs(self, index: torch.Tensor, guided: bool) -> dict[str, Any]:
        embeds, mask = self.embeds[index], self.mask[index]
        if guided:
            embeds = torch.cat([embeds, self.negative_embeds.expand(len(index), -1, -1)])
            mask = torch.cat([mask, self.negative_mask.expand(len(index), -1)])
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


class FewStepSampler:
    """Guided sampling with one model (or one per step) and optional per-step time conditioning."""

    def __init__(self, models: torch.nn.Module | Sequence[torch.nn.Module], steps: int, guidance_scale: float,
                 conditioning: Conditioning, channels: int) -> None:
        self.models = list(models) if isinstance(models, Sequence) else [models] * steps
        if len(self.models) != steps:
            raise TmpdiffError(f"{len(self.models)} step models for {steps} steps")
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.conditioning = conditioning
        self.channels = channels
        self._overrides = {id(m): EmbeddingOverride(m) for m in self.models}

    @property
    def slots(self) -> list[str]:
        return self._overrides[id(self.models[0])].slots

    def sample_states(self, scheduler, index: torch.Tensor, noise: torch.Tensor, *,
                      embeddings: torch.Tensor | None = None, shifts: torch.Tensor | None = None,
                      timesteps: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The latent after each of the N steps (the last is the sample) for conditions `index` from `noise`. Gradients
        flow to `embeddings` ((steps, slots, dim)) and `shifts` ((steps,)) when they require them."""
        if timesteps is None:
            scheduler.set_timesteps(self.steps)
        else:
            scheduler.set_timesteps(timesteps=list(timesteps))
        if len(scheduler.timesteps) != self.steps:
            raise TmpdiffError(f"the scheduler runs {len(scheduler.timesteps)} steps, the sampler {self.steps}")
        use_cfg = self.guidance_scale != 1.0
        cond = self.conditioning.kwargs(index, use_cfg)
        latent = noise * scheduler.init_noise_sigma
        states = []
        with contextlib.ExitStack() as stack:
            for override in self._overrides.values():
                stack.enter_context(override)
            for index, t in enumerate(scheduler.timesteps):
                scaled = scheduler.scale_model_input(latent, t)
                x = torch.cat([scaled, scaled]) if use_cfg else scaled
                timestep = torch.full((x.shape[0],), float(t))
                if shifts is not None:
                    timestep = timestep + shifts[index]
                model = self.models[index]
                with self._overrides[id(model)].at(None if embeddings is None else embeddings[index]):
                    eps = model(x, timestep=timestep, **cond, return_dict=False)[0][:, : self.channels]
                eps = guided(eps.float(), self.guidance_scale) if use_cfg else eps.float()
                latent = scheduler.step(eps, t, latent).prev_sample
                states.append(latent)
        return states


@torch.no_grad()
def reference_states(model: torch.nn.Module, config: dict[str, Any], student_timesteps: Sequence[int],
                     index: torch.Tensor, noise: torch.Tensor, *, guidance_scale: float,
                     conditioning: Conditioning, channels: int, reference_steps: int = 50, batch: int = 32) -> torch.Tensor:
    """(N, B, C, H, W): the many-step fp32 DPM-Solver++ latents at student timesteps 2..N, then the final sample.

    Its timesteps are `reference_steps` evenly spaced ones united with the student's, so every student timestep
    is a point of the reference trajectory (the same probability-flow ODE whichever solver the student uses).
    """
    import numpy as np

    train = int(config.get("num_train_timesteps", 1000))
    grid = {int(t) for t in np.linspace(0, train - 1, reference_steps + 1).round()[1:]}
    timesteps = sorted(grid | {int(t) for t in student_timesteps}, reverse=True)
    wanted = {int(t): i for i, t in enumerate(student_timesteps[1:])}
    sampler = FewStepSampler(model, len(timesteps), guidance_scale, conditioning, channels)
    out = torch.zeros((len(student_timesteps), *noise.shape))
    for start in range(0, noise.shape[0], batch):
        part = slice(start, start + batch)
        states = sampler.sample_states(make_scheduler(Solver.dpmsolver, config), index[part], noise[part],
                                       timesteps=timesteps)
        for k, state in enumerate(states[:-1]):
            if timesteps[k + 1] in wanted:
                out[wanted[timesteps[k + 1]], part] = state
        out[-1, part] = states[-1]
    return out
