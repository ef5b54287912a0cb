"""Parallel sampling on Ray: each worker a Ray actor holding its own engines; a local Ray started on demand.

Ray is imported only when an executor is made (never at CLI start-up). Install it with `pip install '.[ray]'`.
Actor i runs a round's call i; results come back in call order, so the samples are those of the in-process executor.
An actor that dies or fails mid-run fails the run with its cause in one line (never a silent wrong image).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.runtime.parallel import CallResult, DenoiseCall
from tmpdiff.runtime.time_conditioning import TimeConditioning
from tmpdiff.runtime.workers import WorkerSpec

OBJECT_STORE_BYTES = 100 * 1024 * 1024  # a local Ray's shared memory: our objects are a few latents


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def default_threads(workers: int, cores: int | None = None) -> int:
    """Each worker's share of the cores (at least one thread)."""
    return max(1, (cores or os.cpu_count() or 1) // workers)


def connect_ray(cpus_needed: int, address: str | None = None) -> bool:
    """Join the cluster at `address`, or start a local Ray with at least `cpus_needed` CPUs (this machine's count
    when larger); a Ray already initialised in this process is used as is. True when this call started it (the
    caller shuts it down)."""
    if not ray_available():
        raise TmpdiffError("this needs Ray: pip install 'tmpdiff[ray]'")
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, cpus_needed), include_dashboard=False, log_to_driver=False,
                 object_store_memory=OBJECT_STORE_BYTES)
    return True


def stop_actors(actors: Sequence, started_here: bool) -> None:
    """Kill the actors; shut Ray down when this process started it (`connect_ray` said so)."""
    import ray

    for actor in actors:
        ray.kill(actor)
    if started_here:
        ray.shutdown()


def error_cause(exc: Exception) -> str:
    """The last line of what a Ray task raised (its own error, not Ray's wrapper)."""
    cause = getattr(exc, "cause", None)
    text = str(cause if isinstance(cause, Exception) else exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class RayWorker:
    """The actor: builds its worker (engines, buffers) in its own process and answers one call at a time."""

    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(spec.threads or 1)
        self.worker = spec.build()

    def ready(self) -> int:
        return os.getpid()

    def begin(self, class_labels: torch.Tensor, conditioning: TimeConditioning | None = None) -> None:
        self.worker.begin(class_labels, conditioning)

    def denoise(self, call: DenoiseCall) -> CallResult:
        result = self.worker.denoise(call)
        return CallResult(result.eps.cpu(), result.precision, result.fallback_from, result.seconds)

    def close(self) -> None:
        self.worker.close()


class ActorGroup:
    """`workers` Ray actors of `actor_class`, each built from `spec` with `spec.threads` CPUs (and one GPU each when
    the engines run on CUDA); Ray start-up and engine loading are timed apart (`startup_seconds`)."""

    def __init__(self, actor_class: type, spec, workers: int, address: str | None, what: str, lost: str) -> None:
        if not ray_available():
            raise TmpdiffError("--executor ray needs Ray: pip install 'tmpdiff[ray]'")
        if workers < 1:
            raise TmpdiffError(f"Ray {what}s: at least one is needed, got {workers}")
        import ray

        start = time.perf_counter()
        threads = spec.threads or 1
        self.what, self.lost = what, lost  # how errors name a worker, and what a lost one costs
        self.started_here = connect_ray(workers * threads, address)
        actor = ray.remote(num_cpus=threads, num_gpus=0 if spec.device == "cpu" else 1)(actor_class)
        self.actors = [actor.remote(spec) for _ in range(workers)]
        self.pids = self.get([a.ready.remote() for a in self.actors])
        self.startup_seconds = time.perf_counter() - start

    def get(self, refs):
        """The results of `refs`, in order; a worker's failure or death is one line naming it."""
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:  # a worker raised: its own error, one line
            raise TmpdiffError(f"a Ray {self.what} failed: {error_cause(exc)}") from None
        except ray.exceptions.RayError as exc:  # the actor died (killed, out of memory, node lost)
            raise TmpdiffError(f"a Ray {self.what} died mid-run ({type(exc).__name__}); {self.lost}") from None

    def close(self) -> None:
        stop_actors(self.actors, self.started_here)
        self.actors, self.started_here = [], False


class RayExecutor:
    """`workers` Ray actors running a round's calls, actor i call i."""

    def __init__(self, spec: WorkerSpec, workers: int, address: str | None = None) -> None:
        self.workers = workers
        self.group = ActorGroup(RayWorker, spec, workers, address, "worker", "no sample was produced")
        self.startup_seconds = self.group.startup_seconds

    @property
    def actors(self) -> list:
        return self.group.actors

    @property
    def pids(self) -> list[int]:
        return self.group.pids

    @property
    def started_here(self) -> bool:
        return self.group.started_here

    def begin(self, class_labels: torch.Tensor, conditioning: TimeConditioning | None = None) -> None:
        self.group.get([a.begin.remote(class_labels, conditioning) for a in self.actors])

    def evaluate(self, calls: Sequence[DenoiseCall]) -> list[CallResult]:
        if len(calls) > self.workers:
            raise TmpdiffError(f"{len(calls)} calls for {self.workers} Ray workers in one round")
        return self.group.get([actor.denoise.remote(call) for actor, call in zip(self.actors, calls, strict=False)])

    def close(self) -> None:
        self.group.close()
