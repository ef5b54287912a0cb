"""Calibration inside a diffusers pipeline: E(Z) from the stock pipeline run with the engines.

The pipeline (its text encoder, VAE, scheduler, step count and classifier-free guidance) samples from fixed seeds
with the build's engines attached as its denoiser (`attach_engines`); each schedule is the plan the attached
denoiser follows for one set of calls. A text-to-image pipeline samples prompts; a class-conditional one
(DiTPipeline) samples class labels. Errors are measured on the final latents (relative MSE) and on the decoded
RGB images (SSIM over all channels, PSNR). The same `Problem` and searches as the class-conditional model run on it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from tmpdiff.calibration.evaluator import METRICS, Evaluation
from tmpdiff.calibration.search import Problem
from tmpdiff.calibration.session import CalibrationSession, check_steps, level_costs, reporting
from tmpdiff.eval.metrics import PSNR_CAP_DB, latent_errors
from tmpdiff.eval.rgb import mean_rgb_metrics, rgb_metrics
from tmpdiff.formats.costs import load_costs
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import MANIFEST_NAME, load_manifest
from tmpdiff.formats.schedule import Schedule, SchedulerRef
from tmpdiff.models.schedulers import check_distinct_timesteps, check_step_count, set_custom_timesteps
from tmpdiff.runtime.call_memo import CallMemo, attached
from tmpdiff.runtime.dropin import EngineDenoiser, attach_engines
from tmpdiff.runtime.encoder_memo import EncoderMemo, memoized_encoders
from tmpdiff.runtime.pipeline_io import (
    call_kwargs,
    call_parameters,
    check_pipeline_denoiser,
    conditioning_kwargs,
    decode_latents,
    final_latents,
    load_pipeline,
)
from tmpdiff.runtime.plan import resolve_plan


@dataclass
class PipelineEvaluator:
    """Runs schedules through the pipeline over `conditions` x `seeds` (one pipeline call per seed) and caches E(Z).
    `conditions` are prompts (strs), or class labels (ints) for a pipeline that takes them."""

    pipe: object
    denoiser: EngineDenoiser
    conditions: list[str] | list[int]
    seeds: list[int]
    steps: int
    guidance_scale: float | None
    reference: str
    cache: dict[tuple[str, ...], Evaluation] = field(default_factory=dict)
    runs: int = 0  # schedules actually run (cache misses), reference excluded
    timesteps: tuple[int, ...] | None = None  # the training timesteps every schedule samples at (None: the spacing)
    memo: CallMemo | None = field(default_factory=CallMemo)  # shared prefixes' engine calls (untimed runs)
    encoder_memos: dict[str, EncoderMemo] = field(default_factory=dict)  # the prompts' encodings, made once

    def __post_init__(self) -> None:
        if not self.conditions or not self.seeds:
            raise TmpdiffError("calibration set is empty: give at least one prompt (or class label) and one seed")
        self.inputs = conditioning_kwargs(self.pipe, self.conditions, None)
        self.runner = SimpleNamespace(engines=self.denoiser.engines)  # what calibrate's timing report reads
        self.labels = [c for _ in self.seeds for c in self.conditions]  # one entry per sample
        ref = tuple([self.reference] * self.steps)
        self.reference_latents, _ = self._run(ref)
        self.reference_images = decode_latents(self.pipe, self.reference_latents)
        self.cache[ref] = Evaluation(ref, 0.0, 1.0, float("inf"))

    def _run(self, schedule: Sequence[str], timed: bool = False) -> tuple[torch.Tensor, float]:
        """Final latents (samples in seed-major order) and the seconds spent in denoiser calls. Untimed runs reuse
        identical engine calls through `memo`, unless the caller attached its own memo to the denoiser."""
        # timed runs time denoiser calls only: the prompts' encodings may still be reused
        self.last_fallbacks = 0  # denoiser calls that fell back to a higher precision (NaN/Inf), over every seed
        with attached(self.denoiser, None if timed else self.memo), memoized_encoders(self.pipe, self.encoder_memos):
            return self._run_calls(schedule)

    def _run_calls(self, schedule: Sequence[str]) -> tuple[torch.Tensor, float]:
        at = None if self.timesteps is None else list(self.timesteps)
        self.denoiser.plan = resolve_plan(Schedule(steps=len(schedule), precisions=list(schedule), timesteps=at))
        latents, seconds = [], 0.0
        for seed in self.seeds:
            kwargs = call_kwargs(self.pipe, steps=self.steps, seed=seed, guidance_scale=self.guidance_scale,
                                 text_len=getattr(self.denoiser.adapter, "text_len", None),
                                 sample_size=self.denoiser.config.get("sample_size"))
            if at is not None:
                kwargs["timesteps"] = at  # the drop-in checks the pipeline runs exactly these
            latents.append(final_latents(self.pipe, **self.inputs, **kwargs))
            trace = self.denoiser.trace
            seconds += sum(event.seconds for event in trace.steps)
            self.last_fallbacks += len(trace.fallbacks)
        return torch.cat(latents), seconds

    def evaluate(self, schedule: Sequence[str]) -> Evaluation:
        """E(Z) for a schedule (from the cache when already run)."""
        key = tuple(schedule)
        if len(key) != self.steps:
            raise TmpdiffError(f"schedule of {len(key)} steps for a {self.steps}-step calibration")
        if key not in self.cache:
            latents, _ = self._run(key)
            diff = (latents - self.reference_latents).flatten(1).pow(2).sum(1)
            norm = self.reference_latents.flatten(1).pow(2).sum(1).clamp_min(1e-12)
            ssim, psnr = mean_rgb_metrics(decode_latents(self.pipe, latents), self.reference_images)
            self.cache[key] = Evaluation(key, float((diff / norm).mean()), ssim, psnr, self.last_fallbacks)
            self.runs += 1
        return self.cache[key]

    @property
    def fell_back(self) -> int:
        """Evaluated schedules whose run fell back to a higher precision at some denoiser call (NaN/Inf output)."""
        return sum(1 for e in self.cache.values() if e.fallbacks)

    def time_sampling(self, schedules: Sequence[Sequence[str]], repeats: int = 3) -> list[float]:
        """Median seconds of denoiser calls per run of the calibration set, each schedule in turn, `repeats` rounds
        (order reversed every other round)."""
        if repeats < 1:
            raise TmpdiffError(f"repeats must be >= 1, got {repeats}")
        times: list[list[float]] = [[] for _ in schedules]
        order = list(range(len(schedules)))
        for round_ in range(repeats):
            for i in order if round_ % 2 == 0 else order[::-1]:
                times[i].append(self._run(schedules[i], timed=True)[1])
        return [statistics.median(t) for t in times]

    def latents(self, schedule: Sequence[str]) -> torch.Tensor:
        return self._run(schedule)[0]

    def sample_errors(self, latents: torch.Tensor) -> tuple[dict[str, np.ndarray], torch.Tensor]:
        """Per sample of `latents` against the reference's: latent error, 1 - SSIM and PSNR (RGB, capped); and the
        decoded images."""
        images = decode_latents(self.pipe, latents)
        ssim, psnr = rgb_metrics(images, self.reference_images)
        return {"latent": latent_errors(latents, self.reference_latents), "one_minus_ssim": 1.0 - ssim,
                "psnr": np.minimum(psnr, PSNR_CAP_DB)}, images

    def images(self, schedule: Sequence[str]) -> torch.Tensor:
        """Decoded images (N, 3, H, W) in [0, 1] of a schedule."""
        return decode_latents(self.pipe, self.latents(schedule))

    def close(self) -> None:
        self.denoiser.close()


@dataclass
class PipelineSession(CalibrationSession):
    """A calibration session whose samples come from a diffusers pipeline; its scheduler is the pipeline's."""

    pipeline_dir: Path | None = None
    scheduler: SchedulerRef | None = None

    def scheduler_ref(self) -> SchedulerRef:
        return self.scheduler


def open_pipeline_session(build_dir: Path, costs_path: Path, pipeline_dir: Path, conditions: Sequence[str] | Sequence[int],
                          seeds: Sequence[int], steps: int | None = None, metric: str = "latent", reference: str = "fp32",
                          guidance_scale: float | None = None, backend: str = "ort", device: str = "cpu",
                          threads: int | None = None, levels: Sequence[str] | None = None,
                          on_evaluation: Callable[[Evaluation], None] = lambda _: None,
                          check: Callable[[Problem], object] = lambda _: None,
                          default_steps: int = 20, timesteps: Sequence[int] | None = None) -> PipelineSession:
    """Check every input first (pipeline vs build, costs vs built engines, metric), then attach the engines to the
    pipeline and run the reference schedule. With `timesteps` (one per step, e.g. a TMPQ-DM plan's) every schedule,
    the all-reference one included, samples at exactly those; the pipeline's scheduler must take them. `conditions`:
    prompts, or class labels for a pipeline that takes them (DiTPipeline)."""
    if metric not in METRICS:
        raise TmpdiffError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    steps = steps or default_steps
    check_steps(steps)
    conditions, seeds = list(conditions), list(seeds)
    if not conditions or not seeds:
        raise TmpdiffError("calibration set is empty: give at least one prompt (or class label) and one seed")
    manifest = load_manifest(build_dir)
    check_pipeline_denoiser(pipeline_dir, manifest.model_sha256, build_dir / MANIFEST_NAME)
    costs = load_costs(costs_path)
    cost = level_costs(build_dir, manifest, costs, costs_path, backend, device, levels, reference)
    probe = Problem.create(steps, reference, cost, metric, evaluate=lambda z: None)  # type: ignore[arg-type]
    check(probe)  # e.g. an unreachable speedup target: refused before any engine runs
    pipe = load_pipeline(pipeline_dir)
    if timesteps is None:  # the scheduler's own spacing must not run out of timesteps (designed repeats pass)
        check_distinct_timesteps(type(pipe.scheduler).from_config(pipe.scheduler.config), steps)
    else:
        check_step_count(pipe.scheduler, steps)
    conditioning_kwargs(pipe, conditions, pipeline_dir, ("--calib-classes", "--prompts"),  # the kind it takes
                        num_classes=manifest.denoiser_config.get("num_embeds_ada_norm"))
    if timesteps is not None:
        timesteps = tuple(int(t) for t in timesteps)
        if len(timesteps) != steps:
            raise TmpdiffError(f"{len(timesteps)} timesteps for a {steps}-step calibration")
        if "timesteps" not in call_parameters(pipe):
            raise TmpdiffError(f"{type(pipe).__name__} takes no timesteps=: it cannot sample at chosen timesteps",
                               pipeline_dir)
        set_custom_timesteps(type(pipe.scheduler).from_config(pipe.scheduler.config), timesteps)  # refused here
    denoiser = attach_engines(pipe, build_dir, precision=reference, backend=backend, device=device, threads=threads)
    missing = [p for p in probe.all_levels if p not in denoiser.engines]
    if missing:
        raise TmpdiffError(f"no {backend} engine loaded for {', '.join(missing)}", build_dir)
    if device != "cpu":
        pipe.to("cuda")
    evaluator = PipelineEvaluator(pipe, denoiser, conditions, seeds, steps, guidance_scale, reference, timesteps=timesteps)

    problem = Problem(probe.steps, probe.reference, probe.levels, probe.cost, metric, reporting(evaluator, on_evaluation))
    scheduler = SchedulerRef(class_name=type(pipe.scheduler).__name__, config=dict(pipe.scheduler.config))
    return PipelineSession(build_dir, manifest, costs, evaluator, problem, pipeline_dir=pipeline_dir, scheduler=scheduler)


def attribute_judge(pipeline_dir: Path, prompts: Sequence[str]) -> tuple[object, list] | None:
    """The pipeline's attribute classifier and the attributes each prompt asks for, when the pipeline ships one (the
    bundled one does) and every prompt names its attributes; None otherwise."""
    from tmpdiff.eval.attributes import AttributeClassifier
    from tmpdiff.models.colored_digits import parse_prompt
    from tmpdiff.models.tiny_t2i import CLASSIFIER_SUBFOLDER

    classifier_dir = pipeline_dir / CLASSIFIER_SUBFOLDER
    if not (classifier_dir / "config.json").is_file() or not all(isinstance(p, str) for p in prompts):
        return None  # no classifier, or class labels: nothing parses them
    try:
        combos = [parse_prompt(p) for p in prompts]
    except TmpdiffError:
        return None
    return AttributeClassifier.load(classifier_dir), combos


def judge_schedules(session: PipelineSession, schedules: dict[str, Sequence[str]],
                    progress: bool = True) -> dict[str, dict] | None:
    """Prompt adherence and the Fréchet distance to the reference's images (classifier features, 8-d) of each schedule,
    when the pipeline has an attribute judge (`attribute_judge`); None otherwise."""
    from tmpdiff.eval.t2i import LowAttributes, judge

    evaluator: PipelineEvaluator = session.evaluator  # type: ignore[assignment]
    judged = attribute_judge(session.pipeline_dir, evaluator.labels)
    if judged is None:
        return None
    classifier, combos = judged
    low = LowAttributes(classifier)  # a calibration set's tens of images: FD in 8 dimensions
    reference = evaluator.reference_images * 2 - 1
    out = {}
    for name, schedule in tqdm(schedules.items(), desc="judging", leave=False, disable=not progress):
        images = evaluator.images(schedule) * 2 - 1
        # a Fréchet distance needs two images per set (a covariance); one sample has none (None)
        fd = low.fd(images, reference) if len(images) >= 2 else None
        out[name] = judge(classifier, images, combos) | {"fd_vs_reference": fd}
    return out
