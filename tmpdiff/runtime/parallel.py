"""DRiffusion-style parallel draft-and-refine sampling: N denoiser calls per round, on N workers or emulated on one.

From the paper (Bai, Zhang, Deng, arXiv 2603.25872, as issue 18 states it; its code is not public): from an anchor
state x_k, *draft* the states of the next timesteps with a closed-form skip transition (a DDIM/ODE jump using a noise
estimate), run the denoiser on all drafts in parallel (one call per worker), then *refine*: run the standard sampler
updates along the original trajectory with those noise estimates; the refined states become the next anchors. Two
modes, with acceleration rates 1/n and 2/(n+1) in sequential rounds of denoiser calls.

Ours (where the paper, as we have it, is silent):

* the skip transition is the deterministic DDIM jump in VP space, x0 = (x - s_k e) / a_k (clipped the way the
  scheduler clips: its `thresholding` or DDIM's `clip_sample`, and e re-derived from the clipped x0), then
  x_j = a_j x0 + s_j e; a and s come from the scheduler's own sigmas where it has them, else from alphas_cumprod;
* which mode is which: **conservative** (rate 2/(n+1)) spends a round on the anchor alone, then drafts the next n
  steps from the anchor's *fresh* noise estimate and evaluates them in a second round: n + 1 steps per 2 rounds.
  **aggressive** (rate 1/n) evaluates the anchor and n - 1 drafts in the same round; the drafts are jumped from the
  anchor with the *previous* round's last noise estimate (the one the anchor was refined with): n steps per round,
  after a first round that evaluates x_0 alone (there is no estimate yet);
* every step gets exactly one denoiser call in both modes (T calls for T steps, as sequentially); the call for step j
  runs the engine the schedule names for step j, with classifier-free guidance in one batched call and the NaN/Inf
  guard, exactly as `ScheduledRunner` does; refinement calls the scheduler's `step` once per step, in order, so a
  multistep solver keeps its own history;
* N = 1 is the sequential sampler in both modes (an aggressive round of one worker is exactly one sequential step;
  a conservative one would gain nothing), bit for bit;
* only deterministic VP-space schedulers whose `scale_model_input` is the identity can be drafted (DDIM,
  DPM-Solver(++) multistep, UniPC, DEIS); others are refused (`check_parallel_scheduler`).

ParaDiGMS (diffusers' `DDPMParallelScheduler`, Picard iterations over a sliding window) was read for comparison: it
also batches the denoiser over several timesteps, but iterates to a tolerance and costs more calls than steps;
nothing of its code is used here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.models.schedulers import set_sampling_timesteps
from tmpdiff.runtime.time_conditioning import TimeConditioning
from tmpdiff.runtime.trace import RunTrace, StepEvent


class ParallelMode(StrEnum):
    conservative = "conservative"  # 2/(n+1): anchor round, then n drafts from its fresh estimate
    aggressive = "aggressive"  # 1/n: anchor + n-1 drafts from the previous estimate, one round


# Deterministic solvers whose latents are VP states (scale_model_input is the identity): the DDIM jump expresses them.
DRAFTABLE = ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class DenoiseCall:
    """One denoiser call: the latent standing for step `index` (at `timestep`), on the engine of `precision`."""

    index: int
    timestep: float
    precision: str
    latent: torch.Tensor


@dataclass(frozen=True)
class CallResult:
    eps: torch.Tensor  # the guided noise estimate
    precision: str  # the precision that produced it (a NaN fallback's, if any)
    fallback_from: str | None
    seconds: float


class Executor(Protocol):
    """Runs one round's calls on `workers` workers; results in call order. Identical numbers however they run."""

    workers: int

    def begin(self, class_labels: torch.Tensor, conditioning: TimeConditioning | None = None) -> None: ...

    def evaluate(self, calls: Sequence[DenoiseCall]) -> list[CallResult]: ...

    def close(self) -> None: ...


@dataclass
class ParallelResult:
    latents: torch.Tensor
    trace: RunTrace  # one event per denoiser call, in round order (index: the step it stands for)
    rounds: int  # sequential rounds of denoiser calls
    calls: int


def expected_rounds(steps: int, workers: int, mode: ParallelMode | str) -> int:
    """Sequential rounds of denoiser calls for `steps` steps: the modes' rates made exact at the ends."""
    if workers == 1:
        return steps
    if ParallelMode(mode) is ParallelMode.aggressive:
        return 1 + -(-(steps - 1) // workers)  # x_0 alone, then n steps a round
    full, rest = divmod(steps, workers + 1)
    return 2 * full + min(rest, 2)  # a last anchor alone (1 round) or anchor + drafts (2)


def check_parallel_scheduler(scheduler) -> None:
    """Refuse, in one line, a scheduler the DDIM skip transition cannot express."""
    name, config = type(scheduler).__name__, scheduler.config
    if name not in DRAFTABLE:
        raise TmpdiffError(f"--parallel drafts with a DDIM jump in VP space; {name} cannot be drafted "
                           f"(use one of {', '.join(DRAFTABLE)})")
    if str(config.get("algorithm_type", "")).startswith("sde-"):
        raise TmpdiffError(f"--parallel needs a deterministic solver; {name} with algorithm_type "
                           f"{config.get('algorithm_type')} adds noise at every step")
    if config.get("use_flow_sigmas") or config.get("prediction_type") not in PREDICTIONS:
        raise TmpdiffError(f"--parallel drafts VP states; {name} with prediction_type {config.get('prediction_type')!r}"
                           f"{' and flow sigmas' if config.get('use_flow_sigmas') else ''} is not one")


def vp_scales(scheduler, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The VP signal and noise scales of step `index`: from the scheduler's sigmas where it has them."""
    if hasattr(scheduler, "_sigma_to_alpha_sigma_t") and getattr(scheduler, "sigmas", None) is not None:
        return scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[index])
    cumprod = scheduler.alphas_cumprod[int(scheduler.timesteps[index])]
    return cumprod.sqrt(), (1 - cumprod).sqrt()


def skip_transition(scheduler, latent: torch.Tensor, model_output: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The draft of step `end`'s state: a deterministic DDIM jump from `latent` at step `start` with `model_output`."""
    a_k, s_k = (v.to(latent.dtype) for v in vp_scales(scheduler, start))
    a_j, s_j = (v.to(latent.dtype) for v in vp_scales(scheduler, end))
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction == "epsilon":
        x0 = (latent - s_k * model_output) / a_k
    elif prediction == "v_prediction":
        x0 = a_k * latent - s_k * model_output
    else:
        x0 = model_output
    if scheduler.config.get("thresholding"):
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.get("clip_sample"):
        limit = scheduler.config.get("clip_sample_range", 1.0)
        x0 = x0.clamp(-limit, limit)
    eps = (latent - a_k * x0) / s_k
    return a_j * x0 + s_j * eps


def sample_parallel(executor: Executor, scheduler, class_labels: torch.Tensor, noise: torch.Tensor, precisions: list[str],
                    mode: ParallelMode | str = ParallelMode.conservative, timesteps: Sequence[int] | None = None,
                    on_step: Callable[[StepEvent], None] | None = None,
                    conditioning: TimeConditioning | None = None) -> ParallelResult:
    """Draft-and-refine sampling of len(precisions) steps from `noise`, executor.workers calls per round; each
    call gets its step's learned time conditioning (`conditioning`), as in sequential sampling."""
    mode, workers, steps = ParallelMode(mode), executor.workers, len(precisions)
    if workers < 1:
        raise TmpdiffError(f"--parallel must be at least 1, got {workers}")
    set_sampling_timesteps(scheduler, steps, timesteps)
    if workers > 1:
        check_parallel_scheduler(scheduler)
    ts = list(scheduler.timesteps)
    if conditioning is not None:
        conditioning.check_solver(scheduler)
        conditioning.check_timesteps([int(t) for t in ts])
    latent = noise * scheduler.init_noise_sigma
    executor.begin(class_labels, conditioning)
    origin, events, rounds = time.perf_counter(), [], 0
    previous: torch.Tensor | None = None  # aggressive: the last noise estimate of the previous round

    def round_of(calls: list[DenoiseCall]) -> list[torch.Tensor]:
        nonlocal rounds
        start = time.perf_counter() - origin
        results = executor.evaluate(calls)
        rounds += 1
        for call, result in zip(calls, results, strict=True):
            events.append(StepEvent(call.index, int(call.timestep), result.precision, start, result.seconds,
                                    result.fallback_from))
            if on_step is not None:
                on_step(events[-1])
        return [r.eps.to(latent.device) for r in results]

    def call(index: int, state: torch.Tensor) -> DenoiseCall:
        return DenoiseCall(index, float(ts[index]), precisions[index], state)

    k = 0
    while k < steps:
        if mode is ParallelMode.aggressive or workers == 1:
            drafts = 0 if previous is None else min(workers - 1, steps - 1 - k)
            estimates = round_of([call(k, latent)] + [call(k + j, skip_transition(scheduler, latent, previous, k, k + j))
                                                      for j in range(1, drafts + 1)])
        else:
            estimates = round_of([call(k, latent)])
            drafts = min(workers, steps - 1 - k)
            if drafts:
                estimates += round_of([call(k + j, skip_transition(scheduler, latent, estimates[0], k, k + j))
                                       for j in range(1, drafts + 1)])
        for j, eps in enumerate(estimates):  # refine along the original trajectory
            latent = scheduler.step(eps, ts[k + j], latent).prev_sample
        previous, k = estimates[-1], k + len(estimates)
    return ParallelResult(latents=latent, trace=RunTrace(events), rounds=rounds, calls=len(events))
