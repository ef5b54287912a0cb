"""DRiffusion in a pipeline on Ray actors: the pipeline process runs each anchor call, N actors the drafts.

Each actor loads the build's engines into its own `EngineDenoiser` (the drop-in's call path: the same buffers, the
same per-step precision, the same NaN guard) and runs one draft call at a time on the feeds the pipeline process
drafted. Aggressive rounds submit their drafts before the anchor's own call runs (they jump with the previous
round's estimate), so the anchor and its drafts run side by side; conservative rounds run the anchor first, then
their drafts side by side. Results come back in call order: the samples are those of the in-process drop-in (bit
for bit on CPU at the same thread count, tested). An actor that dies or raises fails the pipeline call in one line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.runtime.plan import PrecisionPlan
from tmpdiff.runtime.ray_executor import connect_ray, error_cause, ray_available, stop_actors

Call = tuple[dict[str, Any], int]  # a draft's feeds and the step it stands for


@dataclass(frozen=True)
class DraftWorkerSpec:
    """What a draft actor needs to load its engines (picklable)."""

    build_dir: Path
    plan: PrecisionPlan
    backend: str = "ort"
    device: str = "cpu"
    threads: int | None = None
    nan_guard: bool = True


@dataclass(frozen=True)
class DraftResult:
    output: torch.Tensor
    precision: str  # the engine that produced it (a NaN fallback's, if any)
    fallback_from: str | None
    seconds: float  # inside the actor


class DraftActor:
    """The actor: an `EngineDenoiser` of the build, answering one draft call at a time."""

    def __init__(self, spec: DraftWorkerSpec) -> None:
        from tmpdiff.runtime.dropin import denoiser_for_build

        torch.set_num_threads(spec.threads or 1)
        self.denoiser = denoiser_for_build(spec.build_dir, spec.plan, backend=spec.backend, device=spec.device,
                                           threads=spec.threads, nan_guard=spec.nan_guard)

    def ready(self) -> int:
        return os.getpid()

    def run(self, feeds: dict[str, Any], step: int, timestep: float) -> DraftResult:
        output, used, fallback_from, seconds = self.denoiser.run_call(feeds, step, timestep)
        return DraftResult(output.cpu(), used, fallback_from, seconds)

    def close(self) -> None:
        self.denoiser.close()


class DraftPool:
    """`workers` Ray actors for a pipeline's drafts, each with `spec.threads` CPUs (one GPU each on CUDA)."""

    def __init__(self, spec: DraftWorkerSpec, workers: int, address: str | None = None) -> None:
        if not ray_available():
            raise TmpdiffError("--executor ray needs Ray: pip install 'tmpdiff[ray]'")
        if workers < 1:
            raise TmpdiffError(f"a draft pool needs at least one worker, got {workers}")
        import ray

        start = time.perf_counter()
        threads = spec.threads or 1
        self.started_here = connect_ray(workers * threads, address)
        actor = ray.remote(num_cpus=threads, num_gpus=0 if spec.device == "cpu" else 1)(DraftActor)
        self.actors = [actor.remote(spec) for _ in range(workers)]
        self.pids = self._get([a.ready.remote() for a in self.actors])
        self.startup_seconds = time.perf_counter() - start  # Ray start-up and engine loading, reported apart

    @property
    def workers(self) -> int:
        return len(self.actors)

    def submit(self, calls: Sequence[Call], timesteps: Sequence) -> list:
        """Start each call on its own actor (call i on actor i); returns what `collect` waits for."""
        if len(calls) > len(self.actors):
            raise TmpdiffError(f"{len(calls)} drafts for {len(self.actors)} Ray workers in one round")
        return [actor.run.remote(feeds, step, float(timesteps[step]))
                for actor, (feeds, step) in zip(self.actors, calls, strict=False)]

    def collect(self, handles: list) -> list[DraftResult]:
        return self._get(handles) if handles else []

    def _get(self, refs):
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:  # a worker raised: its own error, one line
            raise TmpdiffError(f"a Ray draft worker failed: {error_cause(exc)}") from None
        except ray.exceptions.RayError as exc:  # the actor died (killed, out of memory, node lost)
            raise TmpdiffError(f"a Ray draft worker died mid-run ({type(exc).__name__}); no image was produced") from None

    def close(self) -> None:
        stop_actors(self.actors, self.started_here)
        self.actors, self.started_here = [], False


def attach_with_ray_drafts(pipe, build_dir, *, parallel: int, mode: str = "conservative", threads: int | None = None,
                           address: str | None = None, backend: str = "ort", device: str = "cpu",
                           nan_guard: bool = True, **options):
    """`attach_engines` with DRiffusion drafts on Ray actors: the anchor runs here; conservative rounds draft N
    states on N actors, aggressive N - 1 beside the anchor. Call `close()` on the denoiser to stop them."""
    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.parallel import ParallelMode
    from tmpdiff.runtime.ray_executor import default_threads

    pipe._tmpdiff_ray_ok = True
    try:
        denoiser = attach_engines(pipe, build_dir, parallel=parallel, mode=mode, threads=threads, address=address,
                                  backend=backend, device=device, nan_guard=nan_guard, executor="ray", **options)
    finally:
        del pipe._tmpdiff_ray_ok
    actors = parallel if denoiser.drafts.mode is ParallelMode.conservative else parallel - 1
    spec = DraftWorkerSpec(Path(build_dir), denoiser.plan, backend, device, threads or default_threads(actors + 1),
                           nan_guard)
    denoiser.draft_pool = DraftPool(spec, actors, address)
    denoiser.draft_pool_startup = denoiser.draft_pool.startup_seconds
    return denoiser
