"""`tmpdiff run`: sample a class-conditional model from a build directory with a precision schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tmpdiff.engines.loading import check_batch, check_threads, load_plan_engines, resolve_device
from tmpdiff.engines.memory import check_fits
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import MANIFEST_NAME, load_manifest
from tmpdiff.models.schedulers import (
    check_distinct_timesteps,
    sampling_scheduler,
    schedule_scheduler,
    set_sampling_timesteps,
)
from tmpdiff.models.time_embedding_input import load_own_table
from tmpdiff.runtime.parallel import ParallelMode, ParallelResult, check_parallel_scheduler, sample_parallel
from tmpdiff.runtime.plan import PrecisionPlan, resolve_plan
from tmpdiff.runtime.runner import RunResult, ScheduledRunner, check_seeds, initial_noise
from tmpdiff.runtime.time_conditioning import check_build
from tmpdiff.runtime.workers import InProcessExecutor, WorkerSpec


@dataclass(kw_only=True)
class RunOptions:
    """What every run names: engines, schedule (or one precision), seed, backend."""

    build_dir: Path
    seed: int = 0
    steps: int | None = None
    schedule_path: Path | None = None
    precision: str | None = None
    backend: str = "ort"
    device: str | None = None  # None: cpu for ORT, cuda for TensorRT (`resolve_device`)
    threads: int | None = None
    guidance_scale: float | None = None
    nan_guard: bool = True  # re-run a non-finite step at the next higher precision (on a GPU: one sync per step)

    def plan(self, default_steps: int) -> PrecisionPlan:
        """The per-step precisions, after every option is checked (before anything is loaded)."""
        self.check()
        return resolve_plan(self.schedule_path, self.precision, steps=self.steps, default_steps=default_steps)

    def check(self) -> None:
        """Options that cannot work are refused by name: seed range, thread count, guidance, backend and device."""
        check_seeds([self.seed])
        check_threads(self.threads)
        if self.guidance_scale is not None and not math.isfinite(self.guidance_scale):
            raise TmpdiffError(f"--guidance must be a finite number, got {self.guidance_scale}")
        self.device = resolve_device(self.backend, self.device)


@dataclass(kw_only=True)
class RunRequest(RunOptions):
    """A class-conditional run of a build directory with sampling info (the bundled model's kind)."""

    classes: list[int]
    parallel: int = 1  # DRiffusion workers (1: the sequential sampler)
    mode: str = "conservative"
    executor: str = "local"  # local: the N calls of a round one after another here; ray: N Ray actors
    address: str | None = None  # an existing Ray cluster (else a local Ray is started)

    def check(self) -> None:
        super().check()
        if self.parallel < 1:
            raise TmpdiffError(f"--parallel must be at least 1, got {self.parallel}")
        if self.mode not in {m.value for m in ParallelMode}:
            raise TmpdiffError(f"--mode must be conservative or aggressive, got {self.mode!r}")
        check_executor(self.parallel, self.executor, self.address)


EXECUTORS = ("local", "ray")


def check_executor(parallel: int, executor: str, address: str | None) -> None:
    """Where a run's N calls per round go, refused by name when it cannot work (before anything is loaded)."""
    if executor not in EXECUTORS:
        raise TmpdiffError(f"--executor must be local or ray, got {executor!r}")
    if address is not None and executor != "ray":
        raise TmpdiffError("--address names a Ray cluster: it needs --executor ray")
    if executor == "ray" and parallel == 1:
        raise TmpdiffError("--executor ray needs --parallel 2 or more (one worker samples sequentially here)")


def check_ray_width(parallel: int, executor: str, steps: int | None) -> None:
    """Refuse Ray workers a round cannot use: it has at most steps - 1 calls, so more actors only hold engines idle."""
    if executor == "ray" and steps is not None and parallel > steps - 1:
        raise TmpdiffError(f"--parallel {parallel} starts more Ray workers than the {steps - 1} calls a round of "
                           f"{steps} steps can have: lower --parallel or raise --steps")


def check_pixel_space(build_dir: Path) -> None:
    """`run --class` writes its samples as an image: only a model that samples gray or RGB pixels can be written
    (no VAE decodes a class-conditional build's latents)."""
    sampling = load_manifest(build_dir).require_sampling(build_dir)
    if sampling.channels not in (1, 3):
        raise TmpdiffError(f"the model samples {sampling.channels}-channel latents, which `run --class` cannot write as "
                           "an image (it decodes no latents; class-conditional models run here in pixel space, 1 or 3 "
                           "channels): run it inside its pipeline, --pipeline DIR --class ...", build_dir / MANIFEST_NAME)


def check_sample_rows(build_dir: Path, samples: int, backend: str, device: str, guidance_scale: float | None,
                      in_pipeline: bool) -> None:
    """`--batch`: refuse `samples` (conditions x --batch) whose batch rows cannot fit, before a per-sample list is
    built (10**9 of them ended in a MemoryError). Rows are counted as the runs count them: x2 with classifier-free
    guidance (the model's default scale, or --guidance; inside a pipeline a scale above 1, its own default being
    unknown until it loads, so rows are a lower bound there)."""
    manifest = load_manifest(build_dir)
    if in_pipeline:
        guided = guidance_scale is not None and guidance_scale > 1
    else:
        guidance = manifest.require_sampling(build_dir).guidance_scale if guidance_scale is None else guidance_scale
        guided = guidance != 1.0
    check_fits(manifest, samples * (2 if guided else 1), backend, device)


def run(request: RunRequest, on_step=None) -> tuple[RunResult | ParallelResult, PrecisionPlan, dict]:
    """Validate everything, load the engines the schedule needs, and sample."""
    manifest = load_manifest(request.build_dir)
    sampling = manifest.require_sampling(request.build_dir)
    plan = request.plan(sampling.default_steps)
    plan.check_model(manifest)
    bad = [c for c in request.classes if not 0 <= c < sampling.num_classes]
    if not request.classes or bad:
        raise TmpdiffError(f"class ids must be in 0..{sampling.num_classes - 1}, got {request.classes}")
    scheduler = (sampling_scheduler(sampling, request.build_dir / MANIFEST_NAME) if plan.file is None
                 else schedule_scheduler(plan.file, sampling, plan.source))  # custom timesteps are checked here
    if plan.timesteps is None:
        check_distinct_timesteps(scheduler, len(plan.precisions))
    if request.parallel > 1:
        check_parallel_scheduler(scheduler)  # before any engine is loaded
        check_ray_width(request.parallel, request.executor, len(plan.precisions))
    guidance = sampling.guidance_scale if request.guidance_scale is None else request.guidance_scale
    conditioning = plan.conditioning
    if conditioning is not None:  # learned rows: for these graphs, this solver's timesteps and this guidance
        check_build(conditioning, manifest, request.build_dir)
        set_sampling_timesteps(scheduler, len(plan.precisions), plan.timesteps)
        conditioning.check_solver(scheduler)
        conditioning.check_timesteps([int(t) for t in scheduler.timesteps])
        conditioning.check_guidance(guidance)
    rows = len(request.classes) * (2 if guidance != 1.0 else 1)
    check_batch(manifest, request.build_dir, request.backend, request.device, rows)
    check_fits(manifest, rows, request.backend, request.device)
    if request.parallel > 1:
        return _run_parallel(request, manifest, plan, scheduler, guidance, on_step)
    engines = load_plan_engines(request.build_dir, manifest, request.backend, request.device, plan.needed,
                                request.threads, what=f"schedule {plan.source}")
    runner = ScheduledRunner(engines, batch=len(request.classes), channels=sampling.channels, size=sampling.image_size,
                             guidance_scale=guidance, null_class=sampling.null_class, num_classes=sampling.num_classes,
                             device=request.device, nan_guard=request.nan_guard,
                             own_time_embeddings=load_own_table(request.build_dir, manifest), owns_engines=True)
    labels = torch.tensor(request.classes, dtype=torch.int64)
    noise = initial_noise(len(labels), sampling.channels, sampling.image_size, request.seed)
    try:
        result = runner.sample(scheduler, labels, noise, list(plan.precisions), on_step=on_step, timesteps=plan.timesteps,
                               conditioning=conditioning, step_seed=request.seed)
    finally:
        runner.close()
    return result, plan, {"source": plan.source, "guidance_scale": guidance}


def _run_parallel(request: RunRequest, manifest, plan: PrecisionPlan, scheduler, guidance: float,
                  on_step) -> tuple[ParallelResult, PrecisionPlan, dict]:
    """DRiffusion sampling with `request.parallel` workers: emulated here one call after another, or on Ray actors."""
    sampling = manifest.sampling
    spec = WorkerSpec(request.build_dir, request.backend, request.device, tuple(plan.needed), request.threads,
                      len(request.classes), sampling.channels, sampling.image_size, guidance, sampling.null_class,
                      sampling.num_classes, request.nan_guard)
    info = {"source": plan.source, "guidance_scale": guidance, "parallel": request.parallel, "mode": request.mode,
            "executor": request.executor}
    if request.executor == "ray":
        from tmpdiff.runtime.ray_executor import RayExecutor, default_threads

        spec = replace(spec, threads=request.threads or default_threads(request.parallel))
        executor = RayExecutor(spec, request.parallel, request.address)
        info["ray_startup_s"] = executor.startup_seconds
    else:
        executor = InProcessExecutor(spec.build(), request.parallel)
    labels = torch.tensor(request.classes, dtype=torch.int64)
    noise = initial_noise(len(labels), sampling.channels, sampling.image_size, request.seed)
    try:
        result = sample_parallel(executor, scheduler, labels, noise, list(plan.precisions), request.mode,
                                 timesteps=plan.timesteps, on_step=on_step, conditioning=plan.conditioning)
    finally:
        executor.close()
    info["rounds"] = result.rounds
    return result, plan, info
