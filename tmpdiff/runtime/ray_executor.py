"""Parallel sampling on Ray: each worker a Ray actor holding its own engines; a local Ray started on demand (and
shut down when the last group of actors using it closes).

Ray is imported only when an executor is made (never at CLI start-up). Install it with `pip install '.[ray]'`.
Actor i runs a round's call i; results come back in call order, so the samples are those of the in-process executor.
An actor that dies or fails mid-run fails the run with its cause in one line (never a silent wrong image).
"""

from __future__ import annotations

import os
import threading
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


# groups holding the local Ray this module started: the last one to close shuts it down
_RAY_LOCK = threading.Lock()
_ray_holders = 0
RESOURCES_SETTLE_SECONDS = 2.0  # how long a shortfall may be actors just killed whose CPUs Ray has not freed yet
# how long a group's actors may take to start (Ray placing them, each loading its engines: a real-size model's take
# a minute or two) before the start is given up rather than waited on forever
START_TIMEOUT_SECONDS = 900.0


def connect_ray(cpus_needed: int, address: str | None = None) -> bool:
    """Join the cluster at `address`, or start a local Ray with at least `cpus_needed` CPUs (this machine's count
    when larger); a Ray initialised elsewhere in this process is used as is. True when the caller holds a share of a
    Ray this module started: it must `release_ray` it once (the last share shuts Ray down)."""
    global _ray_holders
    if not ray_available():
        raise TmpdiffError("this needs Ray: pip install 'tmpdiff[ray]'")
    import ray

    with _RAY_LOCK:
        if ray.is_initialized():
            if _ray_holders == 0:
                return False  # someone else's Ray
            _ray_holders += 1
            return True
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, cpus_needed), include_dashboard=False, log_to_driver=False,
                     object_store_memory=OBJECT_STORE_BYTES)
        _ray_holders = 1
        return True


def release_ray(held: bool) -> None:
    """Give back a share `connect_ray` returned (True); Ray is shut down when no group holds it any more."""
    global _ray_holders
    if not held:
        return
    import ray

    with _RAY_LOCK:
        _ray_holders = max(0, _ray_holders - 1)
        if _ray_holders == 0 and ray.is_initialized():
            ray.shutdown()


def check_resources(workers: int, threads: int, gpus_each: int, what: str, options: str) -> None:
    """Refuse, before any actor is made, `workers` actors of `threads` CPUs (and `gpus_each` GPUs) that the
    cluster cannot place: Ray would wait for them forever. `options` names what the user can lower."""
    import ray

    need = {"CPU": workers * threads, "GPU": workers * gpus_each}
    deadline = time.monotonic() + RESOURCES_SETTLE_SECONDS
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        short = [k for k, n in need.items() if n and free.get(k, 0) < n]
        if not short or any(total.get(k, 0) < need[k] for k in short) or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # the cluster has them: perhaps an actor just killed, whose resources Ray frees shortly
    if short:
        kind = short[0]
        each = f"{threads} CPU{'s' if threads > 1 else ''}" if kind == "CPU" else f"{gpus_each} GPU"
        raise TmpdiffError(f"{workers} Ray {what}s of {each} each need {need[kind]:g} {kind}s; the Ray cluster has "
                           f"{free.get(kind, 0):g} free of {total.get(kind, 0):g}: lower {options}")


def stop_actors(actors: Sequence, started_here: bool) -> None:
    """Kill the actors (any already gone are skipped); give back the share of Ray `connect_ray` returned."""
    import ray

    try:
        if ray.is_initialized():
            for actor in actors:
                try:
                    ray.kill(actor)
                except (ray.exceptions.RayError, ValueError):  # already gone, or a handle of another session
                    pass
    finally:
        release_ray(started_here)


def error_cause(exc: Exception) -> str:
    """The last line of what a Ray task raised (its own error, not Ray's wrapper)."""
    cause = getattr(exc, "cause", None)
    text = str(cause if isinstance(cause, Exception) else exc).strip()
    line = text.splitlines()[-1] if text else type(exc).__name__
    return line.removeprefix(f"{TmpdiffError.__module__}.{TmpdiffError.__name__}: ")


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
    the engines run on CUDA); Ray start-up and engine loading are timed apart (`startup_seconds`). `options` names
    what the user lowers when the cluster cannot hold them. An actor that fails to start, or is not ready within
    START_TIMEOUT_SECONDS, fails the group in one line with its cause, and nothing is left running."""

    def __init__(self, actor_class: type, spec, workers: int, address: str | None, what: str, lost: str,
                 options: str = "--parallel or --threads") -> None:
        if workers < 1:
            raise TmpdiffError(f"Ray {what}s: at least one is needed, got {workers}")
        start = time.perf_counter()
        threads = spec.threads or 1
        gpus = 0 if spec.device == "cpu" else 1
        self.what, self.lost = what, lost  # how errors name a worker, and what a lost one costs
        self.actors: list = []
        self.started_here = connect_ray(workers * threads, address)  # refuses when Ray is not installed
        import ray

        try:
            check_resources(workers, threads, gpus, what, options)
            actor = ray.remote(num_cpus=threads, num_gpus=gpus)(actor_class)
            self.actors = [actor.remote(spec) for _ in range(workers)]
            refs = [a.ready.remote() for a in self.actors]
            _, waiting = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_SECONDS)
            if waiting:  # (an actor that failed to start is not waiting: its error is raised by the get below)
                raise TmpdiffError(f"{len(waiting)} of {workers} Ray {what}s did not start within "
                                   f"{START_TIMEOUT_SECONDS:g} s: Ray could not place them (a cluster still adding "
                                   "nodes?) or their engines did not load")
            self.pids = ray.get(refs)
        except ray.exceptions.RayError as exc:
            self.close()
            raise TmpdiffError(f"a Ray {what} failed to start: {error_cause(exc)}") from None
        except BaseException:
            self.close()
            raise
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


class GroupBacked:
    """What a user of an `ActorGroup` (`self.group`) shows of it: its actors, their PIDs, whether it holds Ray."""

    group: ActorGroup

    @property
    def actors(self) -> list:
        return self.group.actors

    @property
    def pids(self) -> list[int]:
        return self.group.pids

    @property
    def started_here(self) -> bool:
        return self.group.started_here


class RayExecutor(GroupBacked):
    """`workers` Ray actors running a round's calls, actor i call i."""

    def __init__(self, spec: WorkerSpec, workers: int, address: str | None = None) -> None:
        self.workers = workers
        self.group = ActorGroup(RayWorker, spec, workers, address, "worker", "no sample was produced")
        self.startup_seconds = self.group.startup_seconds

    def begin(self, class_labels: torch.Tensor, conditioning: TimeConditioning | None = None) -> None:
        self.group.get([a.begin.remote(class_labels, conditioning) for a in self.actors])

    def evaluate(self, calls: Sequence[DenoiseCall]) -> list[CallResult]:
        if len(calls) > self.workers:
            raise TmpdiffError(f"{len(calls)} calls for {self.workers} Ray workers in one round")
        return self.group.get([actor.denoise.remote(call) for actor, call in zip(self.actors, calls, strict=False)])

    def close(self) -> None:
        self.group.close()
