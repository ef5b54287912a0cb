"""`tmpdiff run --pipeline DIR --prompt ...`: a local diffusers pipeline whose denoiser runs on the build's engines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmpdiff.commands.run import RunOptions, check_executor, check_ray_width
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import MANIFEST_NAME, load_manifest
from tmpdiff.models.schedulers import check_distinct_timesteps, plan_scheduler_for
from tmpdiff.runtime.dropin import EngineDenoiser, attach_engines
from tmpdiff.runtime.pipeline_io import (
    call_kwargs,
    check_pipeline_denoiser,
    conditioning_kwargs,
    load_pipeline,
)
from tmpdiff.runtime.plan import PrecisionPlan

DEFAULT_STEPS = 20  # for a uniform precision without --steps (the pipelines' own defaults range from 4 to 50)


@dataclass(kw_only=True)
class PromptRequest(RunOptions):
    """A text-conditioned run: the denoiser's engines inside a local diffusers pipeline."""

    pipeline_dir: Path
    prompts: list[str]
    class_labels: list[int] | None = None  # a pipeline that takes class labels (DiTPipeline) instead of prompts
    height: int | None = None
    width: int | None = None
    parallel: int = 1  # DRiffusion: N calls per round (here one after another, or on Ray actors: same samples)
    mode: str = "conservative"
    min_alpha: float = 0.0  # drafts only from anchors with at least this signal scale (`dropin_drafts`)
    executor: str = "local"  # local: a round's calls one after another here; ray: the drafts on Ray actors
    address: str | None = None  # an existing Ray cluster (else a local Ray is started)

    def check(self) -> None:
        super().check()
        check_executor(self.parallel, self.executor, self.address)


def load_pipeline_without_denoiser(pipeline_dir: Path):
    """The pipeline's text encoders, VAE and scheduler from a local directory (safetensors only, nothing downloaded)."""
    return load_pipeline(pipeline_dir)


def run_prompts(request: PromptRequest) -> tuple[np.ndarray, EngineDenoiser, str]:
    """Images (N, H, W, 3) uint8 for the prompts (or class labels), the attached denoiser (its trace says what ran),
    and the schedule's source."""
    if request.class_labels is None and (not request.prompts or any(not p.strip() for p in request.prompts)):
        raise TmpdiffError("every --prompt must be non-empty")
    plan = request.plan(DEFAULT_STEPS)
    check_ray_width(request.parallel, request.executor, plan.steps)
    manifest = load_manifest(request.build_dir)
    check_pipeline_denoiser(request.pipeline_dir, manifest.model_sha256, request.build_dir / MANIFEST_NAME)
    pipe = load_pipeline_without_denoiser(request.pipeline_dir)
    inputs = _call_inputs(pipe, request, manifest.denoiser_config.get("num_embeds_ada_norm"))
    use_schedule_scheduler(pipe, plan)
    if plan.steps is not None and plan.timesteps is None:  # (custom timesteps: attach_engines checks them)
        # before any engine loads: 1000 DPM-Solver steps repeat a timestep and end in a NaN hundreds of steps in
        check_distinct_timesteps(type(pipe.scheduler).from_config(pipe.scheduler.config), plan.steps)
    options = {}
    attach = attach_engines
    if request.executor == "ray":
        from tmpdiff.runtime.dropin_ray import attach_with_ray_drafts as attach

        options["address"] = request.address
    denoiser = attach(pipe, request.build_dir, schedule=plan, backend=request.backend, device=request.device,
                      threads=request.threads, nan_guard=request.nan_guard, parallel=request.parallel,
                      mode=request.mode, guidance_scale=request.guidance_scale, min_alpha=request.min_alpha, **options)
    try:
        if request.device != "cpu":
            pipe.to("cuda")
        kwargs = call_kwargs(pipe, steps=plan.steps, seed=request.seed, guidance_scale=request.guidance_scale,
                             text_len=getattr(denoiser.adapter, "text_len", None),
                             sample_size=denoiser.config.get("sample_size"), height=request.height,
                             width=request.width)
        kwargs["output_type"] = "np"
        if plan.timesteps is not None:  # attach_engines checked that the pipeline and its scheduler take them
            kwargs["timesteps"] = plan.timesteps
        try:
            images = pipe(**inputs, **kwargs).images
        except ValueError as exc:  # diffusers pipelines check their arguments with ValueError
            raise TmpdiffError(f"{type(pipe).__name__} refused the call ({exc})", request.pipeline_dir) from None
    finally:  # attach cleans up after itself when it fails; from here on the denoiser (and its Ray actors) is ours
        denoiser.close()
    return (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8), denoiser, plan.source


def use_schedule_scheduler(pipe, plan: PrecisionPlan) -> None:
    """Sample with the scheduler the schedule was calibrated with (its class and config: spacing, solver settings,
    a /3 plan's learned rows' solver) when it names one, refused when its noise process is not the pipeline's; a
    schedule naming none keeps the pipeline's."""
    if plan.file is None:
        return
    scheduler = plan_scheduler_for(plan.file, pipe.scheduler, plan.source)
    if scheduler is not None:
        pipe.scheduler = scheduler


def _call_inputs(pipe, request: PromptRequest, num_classes: int | None) -> dict:
    """The pipeline call's conditioning: its prompts, or the class labels of a pipeline that takes them."""
    conditions = request.prompts if request.class_labels is None else request.class_labels
    return conditioning_kwargs(pipe, conditions, request.pipeline_dir, num_classes=num_classes)
