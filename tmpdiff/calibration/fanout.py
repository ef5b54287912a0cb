"""Calibration fanned out over Ray actors (`--workers N [--address HOST:PORT]`).

A schedule evaluation is one independent sampling run of the calibration set. Each actor holds its own engines
and the same calibration batch (labels, initial noise) and returns a schedule's final latents; the driver computes
every metric from them, exactly as `Evaluator` does in one process. Results are therefore those of one process
running at the actors' thread count (bit-identical on CPU, tested).

The searches keep their sequential logic. They *prefetch* schedules they will ask next (`Problem.prefetch`: the
sensitivity curves' pending midpoints, which are always measured; refinement's next candidates, which may not be)
and the pool evaluates those side by side, so a search returns the same schedule and counts the same evaluations
with any number of workers (a schedule run ahead counts once it is asked for; one never asked for is extra work on the
pool, left in `Evaluator.prefetched`, not an evaluation); only wall time changes.

An actor that dies loses the schedule it was running; the schedule is retried on another actor (sampling is
deterministic, so the retry gives the same latents) and the loss is reported. With every actor gone the run fails
in one line; a worker that raises fails it with the worker's own error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import SamplingInfo
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.call_memo import CallMemo
from tmpdiff.runtime.ray_executor import ActorGroup, GroupBacked, default_threads, error_cause
from tmpdiff.runtime.workers import WorkerSpec


@dataclass(frozen=True)
class SamplingSpec:
    """What an evaluation actor needs (picklable): its engines, the sampler, and the calibration batch."""

    worker: WorkerSpec
    sampling: SamplingInfo
    labels: torch.Tensor
    noise: torch.Tensor
    timesteps: tuple[int, ...] | None = None  # sample at exactly these (None: the scheduler's spacing)

    @property
    def threads(self) -> int | None:
        return self.worker.threads

    @property
    def device(self) -> str:
        return self.worker.device


class SamplingActor:
    """Ray actor: loads its engines once, then samples the calibration batch with one schedule at a time."""

    def __init__(self, spec: SamplingSpec) -> None:
        torch.set_num_threads(spec.worker.threads or 1)
        self.spec = spec
        self.runner = spec.worker.build().runner
        self.runner.call_memo = CallMemo()  # this actor only evaluates: shared prefixes of its schedules are reused

    def ready(self) -> int:
        return os.getpid()

    def sample(self, schedule: tuple[str, ...]) -> tuple[torch.Tensor, int]:
        """Final latents and how many steps fell back to a higher precision (NaN/Inf output)."""
        result = self.runner.sample(sampling_scheduler(self.spec.sampling), self.spec.labels, self.spec.noise,
                                    list(schedule), timesteps=self.spec.timesteps)
        return result.latents.detach().cpu().clone(), len(result.trace.fallbacks)

    def close(self) -> None:
        self.runner.close()


class RaySamplePool(GroupBacked):
    """`workers` evaluation actors (`spec.worker.threads` CPUs each); `map` runs schedules on whichever is idle."""

    def __init__(self, spec: SamplingSpec, workers: int, address: str | None = None,
                 on_lost: Callable[[str], None] = lambda _: None) -> None:
        if workers < 1:
            raise TmpdiffError(f"--workers must be >= 1, got {workers}")
        self.on_lost, self.lost = on_lost, 0
        self.side_by_side = 0  # schedules run in maps of two or more (fanned out)
        self.group = ActorGroup(SamplingActor, spec, workers, address, "evaluation worker", "its schedule is lost",
                                options="--workers or --threads")
        self.startup_seconds = self.group.startup_seconds

    @property
    def width(self) -> int:
        return len(self.actors)

    def map(self, schedules: Sequence[Sequence[str]]) -> list[tuple[torch.Tensor, int]]:
        """Final latents of each schedule and its steps that fell back (NaN/Inf), in order; a schedule whose actor
        died is retried on another."""
        import ray

        if len(schedules) > 1:
            self.side_by_side += len(schedules)
        queue = list(range(len(schedules)))
        idle = list(self.actors)
        running: dict = {}
        out: list[tuple[torch.Tensor, int] | None] = [None] * len(schedules)
        while queue or running:
            while queue and idle:
                actor, index = idle.pop(0), queue.pop(0)
                running[actor.sample.remote(tuple(schedules[index]))] = (actor, index)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, index = running.pop(ref)
            try:
                out[index] = ray.get(ref)
                idle.append(actor)
            except ray.exceptions.RayTaskError as exc:  # the worker raised: its own error
                raise TmpdiffError(f"a Ray evaluation worker failed: {error_cause(exc)}") from None
            except ray.exceptions.RayError as exc:  # the actor died: retry its schedule elsewhere
                self.actors.remove(actor)
                self.lost += 1
                queue.insert(0, index)
                self.on_lost(f"a Ray evaluation worker died ({type(exc).__name__}); its schedule is retried on "
                             f"{len(self.actors)} remaining")
                if not self.actors:
                    raise TmpdiffError("every Ray evaluation worker died; no evaluation was lost silently, but none "
                                       "can finish") from None
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.group.close()


def sampling_pool(build_dir, manifest, backend: str, device: str, levels: Sequence[str], threads: int | None,
                  labels: torch.Tensor, noise: torch.Tensor, workers: int, address: str | None = None,
                  on_lost: Callable[[str], None] = lambda _: None,
                  timesteps: Sequence[int] | None = None) -> RaySamplePool:
    """A pool of `workers` actors for a class-conditional calibration set (threads: each actor's, default
    cores // workers)."""
    sampling = manifest.require_sampling(build_dir)
    spec = WorkerSpec(build_dir, backend, device, tuple(levels), threads or default_threads(workers), len(labels),
                      sampling.channels, sampling.image_size, sampling.guidance_scale, sampling.null_class,
                      sampling.num_classes)
    return RaySamplePool(SamplingSpec(spec, sampling, labels, noise, None if timesteps is None else tuple(timesteps)),
                         workers, address, on_lost)
