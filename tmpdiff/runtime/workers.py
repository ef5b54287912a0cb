"""Denoiser workers for parallel sampling, and the in-process executor that runs a round's calls one after another.

A worker owns its engines bound to one `ScheduledRunner`'s buffers and computes exactly what a sequential step
computes (same buffers, guidance and NaN guard), so a round's calls give the same numbers on any worker.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tmpdiff.engines.streams import on_stream
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.runtime.engine_use import exclusive
from tmpdiff.runtime.parallel import CallResult, DenoiseCall
from tmpdiff.runtime.runner import ScheduledRunner, guided, run_guarded
from tmpdiff.runtime.time_conditioning import TimeConditioning


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to load its own engines (picklable: sent to Ray actors)."""

    build_dir: Path
    backend: str
    device: str
    needed: tuple[str, ...]
    threads: int | None
    batch: int
    channels: int
    size: int
    guidance_scale: float
    null_class: int
    num_classes: int
    nan_guard: bool = True

    def build(self) -> DenoiseWorker:
        """Load this worker's engines (every built one of the backend, for NaN fallbacks) on its buffers."""
        from tmpdiff.engines.loading import load_plan_engines
        from tmpdiff.formats.manifest import load_manifest
        from tmpdiff.models.time_embedding_input import load_own_table

        manifest = load_manifest(self.build_dir)
        engines = load_plan_engines(self.build_dir, manifest, self.backend, self.device, self.needed, self.threads)
        return DenoiseWorker(ScheduledRunner(engines, self.batch, self.channels, self.size, self.guidance_scale,
                                             self.null_class, self.num_classes, device=self.device,
                                             nan_guard=self.nan_guard,
                                             own_time_embeddings=load_own_table(self.build_dir, manifest),
                                             owns_engines=True))


class DenoiseWorker:
    """One worker: a runner's engines and buffers, one guided denoiser call at a time."""

    def __init__(self, runner: ScheduledRunner) -> None:
        self.runner = runner
        self.conditioning: TimeConditioning | None = None

    def begin(self, class_labels: torch.Tensor, conditioning: TimeConditioning | None = None) -> None:
        """A sample's labels (and its schedule's time conditioning) for the calls that follow."""
        r = self.runner
        self.conditioning = conditioning
        r._check_labels(class_labels)
        labels = class_labels.to(r.inputs["class_labels"].device)
        r.inputs["class_labels"].copy_(torch.cat([labels, torch.full_like(labels, r.null_class)]) if r.use_cfg else labels)

    @torch.no_grad()
    def denoise(self, call: DenoiseCall) -> CallResult:
        """The guided noise estimate for `call`, as `ScheduledRunner` computes it for a step."""
        r, start = self.runner, time.perf_counter()
        if call.precision not in r.engines:
            raise TmpdiffError(f"schedule uses {call.precision} but only {', '.join(r.engines)} engines are loaded")
        with exclusive(r.engines.values(), f"step {call.index}"), on_stream(r.stream):
            r.claim()
            latent = call.latent.to(r.inputs["hidden_states"].device)
            r.inputs["hidden_states"][: r.batch].copy_(latent)
            if r.use_cfg:
                r.inputs["hidden_states"][r.batch :].copy_(latent)
            r.set_time_inputs(call.index, call.timestep, self.conditioning)
            used, fallback_from = run_guarded(r.engines, call.precision, r.outputs["noise_pred"], r.stream,
                                              label=f"step {call.index}", nan_guard=r.nan_guard, nvtx=r.nvtx,
                                              inputs=r.inputs)
            eps = r.outputs["noise_pred"]
            eps = guided(eps, r.guidance_scale) if r.use_cfg else eps.clone()
        r.stream.synchronize()
        return CallResult(eps, used, fallback_from, time.perf_counter() - start)

    def close(self) -> None:
        self.runner.close()


class InProcessExecutor:
    """N workers emulated by one: a round's calls run one after another (identical numbers, N times the wall time)."""

    def __init__(self, worker: DenoiseWorker, workers: int) -> None:
        self.worker, self.workers = worker, workers

    def begin(self, class_labels: torch.Tensor, conditioning: TimeConditioning | None = None) -> None:
        self.worker.begin(class_labels, conditioning)

    def evaluate(self, calls: Sequence[DenoiseCall]) -> list[CallResult]:
        return [self.worker.denoise(call) for call in calls]

    def close(self) -> None:
        self.worker.close()
