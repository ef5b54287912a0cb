"""`tmpdiff run`: sample a class-conditional model from a build directory with a precision schedule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tmpdiff.engines.loading import load_built_engines
from tmpdiff.errors import TmpdiffError
from tmpdiff.export.manifest import Manifest, SamplingInfo, load_manifest
from tmpdiff.runtime.runner import RunResult, ScheduledRunner
from tmpdiff.runtime.sampler import initial_noise
from tmpdiff.runtime.schedule import Schedule, load_schedule


@dataclass(kw_only=True)
class RunOptions:
    """What every run names: engines, schedule (or one precision), seed, backend."""

    build_dir: Path
    seed: int = 0
    steps: int | None = None
    schedule_path: Path | None = None
    precision: str | None = None
    backend: str = "ort"
    device: str = "cpu"
    threads: int | None = None
    guidance_scale: float | None = None
    nan_guard: bool = True  # re-run a non-finite step at the next higher precision (on a GPU: one sync per step)


@dataclass(kw_only=True)
class RunRequest(RunOptions):
    """A class-conditional run of a build directory with sampling info (the bundled model's kind)."""

    classes: list[int]


def scheduler_from(sampling: SamplingInfo):
    """A fresh diffusers scheduler of the class and config the build directory recorded."""
    import diffusers

    cls = getattr(diffusers, sampling.scheduler_class, None)
    if cls is None:
        raise TmpdiffError(f"unknown diffusers scheduler {sampling.scheduler_class!r}")
    return cls.from_config(sampling.scheduler_config)


def resolve_schedule(request: RunOptions, default_steps: int) -> tuple[Schedule, str]:
    """The schedule to run and where it came from; checked before any engine is loaded."""
    if (request.schedule_path is None) == (request.precision is None):
        raise TmpdiffError("give exactly one of --schedule FILE or --precision P")
    if request.schedule_path is not None:
        schedule = load_schedule(request.schedule_path)
        if request.steps is not None and request.steps != schedule.steps:
            raise TmpdiffError(f"schedule has {schedule.steps} steps but --steps {request.steps} was given",
                               request.schedule_path)
        return schedule, str(request.schedule_path)
    steps = request.steps or default_steps
    return Schedule.uniform(request.precision, steps), f"uniform {request.precision}"


def sampling_of(manifest: Manifest, build_dir: Path) -> SamplingInfo:
    if manifest.sampling is None:
        raise TmpdiffError("the build directory has no sampling info (exported from a model without tmpdiff_model.json); "
                           "run a text-conditioned model inside its pipeline: --pipeline DIR --prompt TEXT", build_dir / "manifest.json")
    return manifest.sampling


def run(request: RunRequest, on_step=None) -> tuple[RunResult, Schedule, dict]:
    """Validate everything, load the engines the schedule needs, and sample."""
    manifest = load_manifest(request.build_dir)
    sampling = sampling_of(manifest, request.build_dir)
    schedule, source = resolve_schedule(request, sampling.default_steps)
    bad = [c for c in request.classes if not 0 <= c < sampling.num_classes]
    if not request.classes or bad:
        raise TmpdiffError(f"class ids must be in 0..{sampling.num_classes - 1}, got {request.classes}")
    engines = load_built_engines(request.build_dir, manifest, request.backend, request.device, schedule.precisions,
                                 request.threads, what=f"schedule {source}")
    guidance = sampling.guidance_scale if request.guidance_scale is None else request.guidance_scale
    runner = ScheduledRunner(engines, batch=len(request.classes), channels=sampling.channels, size=sampling.image_size,
                             guidance_scale=guidance, null_class=sampling.null_class, num_classes=sampling.num_classes,
                             device=request.device, nan_guard=request.nan_guard)
    labels = torch.tensor(request.classes, dtype=torch.int64)
    noise = initial_noise(len(labels), sampling.channels, sampling.image_size, request.seed)
    try:
        result = runner.sample(scheduler_from(sampling), labels, noise, schedule.precisions, on_step=on_step)
    finally:
        runner.close()
    return result, schedule, {"source": source, "guidance_scale": guidance}
