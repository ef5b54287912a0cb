"""E(Z): how far a schedule's final samples land from the reference schedule's, over a calibration set.

Every evaluation runs the real engines through the runtime (what is calibrated is what is deployed),
from fixed initial noise, and is cached by schedule; engine calls that repeat an earlier evaluation's exactly (a
shared prefix) are reused through a `CallMemo`, never while timing. Latent error is the mean relative squared
distance; SSIM and PSNR of the decoded images come from `tmpdiff.eval.metrics` (scikit-image).
The runner's NaN guard re-runs a step whose output is not finite one precision up; an evaluation counts the steps
that fell back (`Evaluation.fallbacks`), since its quality is then the higher precision's while the schedule is
costed at the lower one: the searches treat such a schedule's error as infinite (`search.Problem.error`).
`time_sampling` times whole sampling runs of schedules on the same engines and calibration batch.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tmpdiff.eval.metrics import image_metrics, to_images
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import SamplingInfo
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.call_memo import CallMemo, attached
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise

METRICS = ("latent", "ssim")


@dataclass(frozen=True)
class Evaluation:
    """One schedule's measured quality against the reference."""

    schedule: tuple[str, ...]
    latent_error: float  # mean over samples of ||x - x_ref||^2 / ||x_ref||^2
    ssim: float  # mean SSIM of decoded images vs the reference's
    psnr: float  # mean PSNR (dB); inf where identical
    fallbacks: int = 0  # steps whose output was not finite and were re-run one precision up (the NaN guard)

    def error(self, metric: str) -> float:
        """The scalar the search minimises: relative latent MSE, or 1 - SSIM."""
        return self.latent_error if metric == "latent" else 1.0 - self.ssim


@dataclass
class Evaluator:
    """Runs schedules over a fixed calibration set and caches E(Z)."""

    runner: ScheduledRunner
    sampling: SamplingInfo
    classes: Sequence[int]
    seeds: Sequence[int]
    reference: str
    steps: int
    cache: dict[tuple[str, ...], Evaluation] = field(default_factory=dict)
    # schedules a search asked for that had to be run (here, or ahead on the pool), reference excluded: the same
    # count with any number of workers, since a schedule run ahead counts only once it is asked for
    runs: int = 0
    pool: Any = None  # a `fanout.RaySamplePool`: evaluations run on its actors, the driver only scores them
    prefetched: set[tuple[str, ...]] = field(default_factory=set)  # run ahead, not yet asked for
    timesteps: tuple[int, ...] | None = None  # every schedule (the reference too) samples at exactly these
    memo: CallMemo | None = field(default_factory=CallMemo)  # shared prefixes' engine calls, in process only

    def __post_init__(self) -> None:
        if not self.classes or not self.seeds:
            raise TmpdiffError("calibration set is empty: give at least one class and one seed")
        self.labels = torch.tensor([c for _ in self.seeds for c in self.classes], dtype=torch.int64)
        self.noise = torch.cat([initial_noise(len(self.classes), self.sampling.channels, self.sampling.image_size, seed)
                                for seed in self.seeds])
        self.reference_latents, _ = self._run([self.reference] * self.steps)
        self.reference_images = to_images(self.reference_latents)
        ref = tuple([self.reference] * self.steps)
        self.cache[ref] = Evaluation(ref, 0.0, 1.0, float("inf"))

    def _run(self, schedule: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Final latents and how many steps fell back to a higher precision (NaN/Inf output)."""
        if self.pool is not None:
            return self.pool.map([tuple(schedule)])[0]
        with attached(self.runner, self.memo):
            result = self.runner.sample(sampling_scheduler(self.sampling), self.labels, self.noise, list(schedule),
                                        timesteps=self.timesteps)
        return result.latents, len(result.trace.fallbacks)

    @property
    def width(self) -> int:
        """Evaluations that run side by side (the pool's live actors; 1 in process)."""
        return 1 if self.pool is None else self.pool.width

    def _score(self, key: tuple[str, ...], run: tuple[torch.Tensor, int]) -> Evaluation:
        latents, fallbacks = run
        diff = (latents - self.reference_latents).flatten(1).pow(2).sum(1)
        norm = self.reference_latents.flatten(1).pow(2).sum(1).clamp_min(1e-12)
        ssim, psnr = image_metrics(to_images(latents), self.reference_images)
        return Evaluation(key, float((diff / norm).mean()), ssim, psnr, fallbacks)

    @property
    def fell_back(self) -> int:
        """Evaluated schedules (asked for by a search) whose run fell back to a higher precision at some step."""
        return sum(1 for key, e in self.cache.items() if e.fallbacks and key not in self.prefetched)

    def evaluate(self, schedule: Sequence[str]) -> Evaluation:
        """E(Z) for a schedule (from the cache when already run)."""
        key = tuple(schedule)
        if len(key) != self.steps:
            raise TmpdiffError(f"schedule of {len(key)} steps for a {self.steps}-step calibration")
        if key not in self.cache:
            self.cache[key] = self._score(key, self._run(key))
            self.runs += 1
        elif key in self.prefetched:  # run ahead on the pool, asked for now
            self.prefetched.discard(key)
            self.runs += 1
        return self.cache[key]

    def prefetch(self, schedules: Sequence[Sequence[str]]) -> None:
        """Run the schedules not yet evaluated side by side on the pool (nothing in process: there it would only
        run work a search might not ask for)."""
        if self.pool is None:
            return
        todo = list(dict.fromkeys(tuple(s) for s in schedules if len(s) == self.steps and tuple(s) not in self.cache))
        if len(todo) < 2:
            return  # one schedule runs when it is asked for
        for key, run in zip(todo, self.pool.map(todo), strict=True):
            self.cache[key] = self._score(key, run)
            self.prefetched.add(key)

    def close(self) -> None:
        """Close the engines and the pool's actors."""
        self.runner.close()
        if self.pool is not None:
            self.pool.close()

    def time_sampling(self, schedules: Sequence[Sequence[str]], repeats: int = 3) -> list[float]:
        """Median wall time (seconds) of sampling the calibration batch with each schedule.

        The schedules are run in turn, `repeats` rounds, the order reversed every other round so that
        drift in the machine's speed (other jobs, clocks) does not favour one of them. A run's time is the
        sum of its per-step times from the runtime trace (engine call, guidance and scheduler update).
        """
        if repeats < 1:
            raise TmpdiffError(f"repeats must be >= 1, got {repeats}")
        for schedule in schedules:
            if len(schedule) != self.steps:
                raise TmpdiffError(f"schedule of {len(schedule)} steps for a {self.steps}-step calibration")
        times: list[list[float]] = [[] for _ in schedules]
        order = list(range(len(schedules)))
        for round_ in range(repeats):
            for i in order if round_ % 2 == 0 else order[::-1]:
                result = self.runner.sample(sampling_scheduler(self.sampling), self.labels, self.noise, list(schedules[i]),
                                            timesteps=self.timesteps)
                times[i].append(sum(step.seconds for step in result.trace.steps))
        return [statistics.median(t) for t in times]

    def latents(self, schedule: Sequence[str]) -> torch.Tensor:
        """Final latents of a schedule (runs it again; used for images and classifier metrics)."""
        return self._run(schedule)[0]
