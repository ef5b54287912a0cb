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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.runtime.plan import PrecisionPlan
from tmpdiff.runtime.ray_executor import ActorGroup

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
    """`workers` Ray actors for a pipeline's drafts (`ActorGroup`), call i of a round on actor i."""

    def __init__(self, spec: DraftWorkerSpec, workers: int, address: str | None = None) -> None:
        self.group = ActorGroup(DraftActor, spec, workers, address, "draft worker", "no image was produced")
        self.startup_seconds = self.group.startup_seconds

    @property
    def actors(self) -> list:
        return self.group.actors

    @property
    def workers(self) -> int:
        return len(self.group.actors)

    def submit(self, calls: Sequence[Call], timesteps: Sequence) -> list:
        """Start each call on its own actor (call i on actor i); returns what `collect` waits for."""
        if len(calls) > self.workers:
            raise TmpdiffError(f"{len(calls)} drafts for {self.workers} Ray workers in one round")
        return [actor.run.remote(feeds, step, float(timesteps[step]))
                for actor, (feeds, step) in zip(self.actors, calls, strict=False)]

    def collect(self, handles: list) -> list[DraftResult]:
        return self.group.get(handles) if handles else []

    def close(self) -> None:
        self.group.close()


def attach_with_ray_drafts(pipe, build_dir, *, parallel: int, mode: str = "conservative", threads: int | None = None,
                           address: str | None = None, backend: str = "ort", device: str = "cpu",
                           nan_guard: bool = True, **options):
    """`attach_engines` with DRiffusion drafts on Ray actors: the anchor runs here; conservative rounds draft N
    states on N actors, aggressive N - 1 beside the anchor. Call `close()` on the denoiser to stop them."""
    from tmpdiff.runtime.dropin import prepare_engines, swap_in
    from tmpdiff.runtime.parallel import ParallelMode
    from tmpdiff.runtime.ray_executor import default_threads

    if parallel < 2:
        raise TmpdiffError("--executor ray needs --parallel 2 or more (one worker samples sequentially here)")
    denoiser, original = prepare_engines(pipe, build_dir, parallel=parallel, mode=mode, threads=threads,
                                         backend=backend, device=device, nan_guard=nan_guard, **options)
    try:
        actors = parallel if denoiser.drafts.mode is ParallelMode.conservative else parallel - 1
        spec = DraftWorkerSpec(Path(build_dir), denoiser.plan, backend, device, threads or default_threads(actors + 1),
                               nan_guard)
        denoiser.draft_pool = DraftPool(spec, actors, address)
    except BaseException:  # the pipeline keeps its denoiser; the engines loaded for this one are freed
        denoiser.close()
        raise
    denoiser.draft_pool_startup = denoiser.draft_pool.startup_seconds
    swap_in(pipe, denoiser, original)
    return denoiser
