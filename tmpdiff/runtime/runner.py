"""The one sampling loop: step t runs on engines[schedule[t]]; all engines share one set of buffers.

The runtime owns the input and output tensors and binds every engine to them once. A step writes the
scaled latent, timestep and labels into those tensors in place, runs the engine the schedule names,
and hands its output to the diffusers scheduler. Switching engines therefore moves no data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from tmpdiff.engines.base import Engine
from tmpdiff.engines.streams import Stream, on_stream, runtime_stream
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.precisions import PRECISION_ORDER, PRECISIONS, next_higher
from tmpdiff.models.schedulers import set_sampling_timesteps, step_generator
from tmpdiff.models.time_embedding_input import INPUT_NAME
from tmpdiff.runtime.call_memo import CallMemo
from tmpdiff.runtime.engine_use import close_engines, ensure_bound, exclusive, release
from tmpdiff.runtime.time_conditioning import TimeConditioning, own_row, takes_time_embeddings
from tmpdiff.runtime.trace import RunTrace, StepClock, StepEvent, nvtx_range, nvtx_wanted

SEEDS = range(2**63)  # what torch's CPU generator takes


def check_seeds(seeds, option: str = "--seed") -> None:
    """Refuse seeds torch's generator does not take, naming the option."""
    bad = [s for s in seeds if s not in SEEDS]
    if bad:
        raise TmpdiffError(f"{option} must be in 0..2^63-1, got {', '.join(map(str, bad))}")


def initial_noise(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Deterministic starting latent for a seed (CPU generator, so it is identical on every machine)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((batch, channels, size, size), generator=gen, dtype=torch.float32)


def guided(eps: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance from one batched call whose first half is conditional, second half unconditional."""
    eps_cond, eps_uncond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def run_guarded(engines: Mapping[str, Engine], precision: str, output: torch.Tensor, stream: Stream, *, label: str,
                nan_guard: bool = True, nvtx: bool = False,
                inputs: Mapping[str, torch.Tensor] | None = None) -> tuple[str, str | None]:
    """Run engines[precision]; while `output` is not finite, re-run at the next higher loaded precision (unless the
    non-finite values came in with `inputs`, the bound input buffers: then no engine is to blame).

    Returns the precision that produced the output and the one it fell back from (None if no fallback).
    """
    if precision not in engines:
        raise TmpdiffError(f"{label}: the plan runs {precision}, which is not loaded (loaded: {', '.join(engines)})")
    used, fallback_from = precision, None
    with nvtx_range(f"{label} {precision}", nvtx):
        engines[precision].run(stream)
    while nan_guard and not bool(torch.isfinite(output).all()):
        bad = next((name for name, buffer in (inputs or {}).items()
                    if buffer.is_floating_point() and not bool(torch.isfinite(buffer).all())), None)
        if bad is not None:
            raise TmpdiffError(f"{label}: the call's {bad} is not finite (NaN or Inf came in with the request, e.g. "
                               "from its guidance scale or latents; no engine produced it)")
        higher = fallback_for(used, list(engines))
        if higher is None:
            raise TmpdiffError(f"{label}: {used} output is not finite and no higher precision is loaded")
        fallback_from = fallback_from or precision
        used = higher
        with nvtx_range(f"{label} {used} (fallback)", nvtx):
            engines[used].run(stream)
    return used, fallback_from


def fallback_for(engine: str, available: list[str]) -> str | None:
    """The engine a non-finite output falls back to: the next higher precision, or for a mixed-precision layer
    configuration (a TMPQ-DM plan's `mixed-...` engine) the highest loaded precision."""
    if engine in PRECISIONS:
        return next_higher(engine, available)
    return next((p for p in PRECISION_ORDER if p in available), None)


@dataclass
class RunResult:
    latents: torch.Tensor
    trace: RunTrace


class ScheduledRunner:
    """Class-conditional sampling with per-step engine choice, classifier-free guidance in one batched call."""

    def __init__(self, engines: Mapping[str, Engine], batch: int, channels: int, size: int, guidance_scale: float,
                 null_class: int, num_classes: int, device: str = "cpu", stream: Stream | None = None,
                 nan_guard: bool = True, nvtx: bool | None = None,
                 own_time_embeddings: torch.Tensor | None = None, owns_engines: bool = False) -> None:
        """`own_time_embeddings`: the build's own table (`load_own_table`), needed when the graphs take a
        `time_embeddings` input (exported with --time-embedding-input) and a step has no learned row.
        `owns_engines`: loaded for this runner alone, so `close` frees them (shared engines are only unbound)."""
        if not engines:
            raise TmpdiffError("no engines to run")
        if not math.isfinite(guidance_scale):
            raise TmpdiffError(f"the guidance scale must be a finite number, got {guidance_scale}")
        torch_device = "cpu" if device == "cpu" else "cuda"
        self.engines = dict(engines)
        self.owns_engines = owns_engines
        self.closed = False
        self.batch = batch
        self.guidance_scale = guidance_scale
        self.use_cfg = guidance_scale != 1.0
        self.null_class = null_class
        self.num_classes = num_classes
        self.stream = stream or runtime_stream(device)
        self.clock = StepClock(getattr(self.stream, "torch", None))
        self.nan_guard = nan_guard
        self.nvtx = nvtx_wanted() if nvtx is None else nvtx
        self.call_memo: CallMemo | None = None  # calibration runs: identical engine calls reused (`call_memo`)
        rows = batch * (2 if self.use_cfg else 1)
        self.inputs = {
            "hidden_states": torch.zeros((rows, channels, size, size), dtype=torch.float32, device=torch_device),
            "timestep": torch.zeros((rows,), dtype=torch.float32, device=torch_device),
            "class_labels": torch.zeros((rows,), dtype=torch.int64, device=torch_device),
        }
        self.outputs = {"noise_pred": torch.zeros((rows, channels, size, size), dtype=torch.float32, device=torch_device)}
        takes = {name for name, engine in self.engines.items() if takes_time_embeddings(engine)}
        if takes and takes != set(self.engines):
            raise TmpdiffError(f"engines {', '.join(sorted(takes))} take a time-embeddings input and "
                               f"{', '.join(sorted(set(self.engines) - takes))} do not: export every precision alike")
        self.own_time_embeddings = own_time_embeddings
        if takes:
            if own_time_embeddings is None:
                raise TmpdiffError("the engines take a time-embeddings input (exported with --time-embedding-input): "
                                   "load the build's own table (models.time_embedding_input.load_own_table)")
            self.inputs[INPUT_NAME] = torch.zeros(tuple(own_time_embeddings.shape[1:]), dtype=torch.float32,
                                                  device=torch_device)
        ensure_bound(self, self.engines.values(), self.inputs, self.outputs, force=True)

    def claim(self) -> None:
        """Bind the engines to this runner's buffers again if another runner (or denoiser) sharing them bound them."""
        ensure_bound(self, self.engines.values(), self.inputs, self.outputs)

    def _check_labels(self, class_labels: torch.Tensor) -> None:
        if class_labels.shape != (self.batch,):
            raise TmpdiffError(f"{tuple(class_labels.shape)} class labels for a runner of batch {self.batch}")
        bad = [int(c) for c in class_labels if not 0 <= int(c) < self.num_classes]
        if bad:
            raise TmpdiffError(f"class id {bad[0]} out of range 0..{self.num_classes - 1}")

    @torch.no_grad()
    def sample(self, scheduler, class_labels: torch.Tensor, noise: torch.Tensor, precisions: list[str],
               on_step: Callable[[StepEvent], None] | None = None, timesteps: Sequence[int] | None = None,
               conditioning: TimeConditioning | None = None, step_seed: int = 0) -> RunResult:
        """Run len(precisions) steps from `noise`; returns the final latents and what ran at each step.

        The scheduler spaces the steps its own way, or samples at exactly `timesteps` (one per precision) when given.
        `conditioning` (a /3 schedule's file) feeds each step its learned embedding row or timestep shift. A stochastic
        scheduler's step noise comes from a generator seeded with `step_seed` (`step_generator`): reproducible, and the
        same for every schedule sampled from the same seed.

        On a GPU nothing here waits for the device between steps (unless the NaN guard is on: reading its
        verdict is one synchronisation per step); step times come from CUDA events read after the run.
        """
        if self.closed:  # (an ORT engine would still run after its close: the runner's state says it is done)
            raise TmpdiffError("the runner was closed: make a new one")
        self._check_labels(class_labels)
        missing = sorted(set(precisions) - set(self.engines))
        if missing:
            raise TmpdiffError(f"schedule uses {', '.join(missing)} but only {', '.join(self.engines)} engines are loaded")
        if noise.shape != self.inputs["hidden_states"][: self.batch].shape:
            raise TmpdiffError(f"noise of shape {tuple(noise.shape)} for buffers of "
                               f"{tuple(self.inputs['hidden_states'][: self.batch].shape)}")
        set_sampling_timesteps(scheduler, len(precisions), timesteps)  # fresh solver state, checked before any work
        self._check_conditioning(conditioning, scheduler)
        with exclusive(self.engines.values(), "ScheduledRunner.sample"):
            self.claim()
            with on_stream(self.stream):  # the caller's stream and the runtime's are ordered with events, not host waits
                latent, marks = self._steps(scheduler, class_labels, noise, precisions, on_step, conditioning,
                                            step_seed)
            self.stream.synchronize()
        trace = RunTrace([self._event(marks[0][4], m) for m in marks])
        if on_step is not None and self.clock.torch_stream is not None:
            for event in trace.steps:
                on_step(event)
        return RunResult(latents=latent, trace=trace)

    def _check_conditioning(self, conditioning: TimeConditioning | None, scheduler) -> None:
        if conditioning is None:
            return
        if conditioning.embeddings is not None and INPUT_NAME not in self.inputs:
            raise TmpdiffError("learned time embeddings need engines with a time-embeddings input "
                               "(export with --time-embedding-input)", conditioning.path)
        conditioning.check_solver(scheduler)
        conditioning.check_timesteps([int(t) for t in scheduler.timesteps])
        conditioning.check_guidance(self.guidance_scale)

    def set_time_inputs(self, index: int, t, conditioning: TimeConditioning | None) -> None:
        """Write step `index`'s timestep (plus its learned shift) and, for graphs that take them, its embeddings."""
        shifts = None if conditioning is None else conditioning.shifts
        self.inputs["timestep"].fill_(float(t) + (0.0 if shifts is None else float(shifts[index])))
        if INPUT_NAME in self.inputs:
            learned = None if conditioning is None else conditioning.embeddings
            row = learned[index] if learned is not None else own_row(self.own_time_embeddings, t, f"step {index}")
            self.inputs[INPUT_NAME].copy_(row)

    def _steps(self, scheduler, class_labels: torch.Tensor, noise: torch.Tensor, precisions: list[str],
               on_step: Callable[[StepEvent], None] | None,
               conditioning: TimeConditioning | None = None, step_seed: int = 0) -> tuple[torch.Tensor, list]:
        """The loop proper, on the runtime stream: write the bound inputs, run the step's engine, update the latent."""
        device = self.inputs["hidden_states"].device
        generator = step_generator(scheduler, step_seed)
        noise_kwargs = {} if generator is None else {"generator": generator}
        latent = noise.to(device) * scheduler.init_noise_sigma
        labels = class_labels.to(device)
        self.inputs["class_labels"].copy_(torch.cat([labels, torch.full_like(labels, self.null_class)])
                                          if self.use_cfg else labels)
        marks: list[tuple[int, int, str, str | None, object, object]] = []
        for index, (t, precision) in enumerate(zip(scheduler.timesteps, precisions, strict=True)):
            start = self.clock.mark()
            # cond and uncond rows get the same latent: written into the bound buffer, no concatenation
            scaled = scheduler.scale_model_input(latent, t)
            self.inputs["hidden_states"][: self.batch].copy_(scaled)
            if self.use_cfg:
                self.inputs["hidden_states"][self.batch :].copy_(scaled)
            self.set_time_inputs(index, t, conditioning)
            used, fallback_from = self._call(index, precision)
            # the scheduler may keep the model output (PNDM's history, multistep DPM-Solver): never the bound buffer
            # the next engine call overwrites in place (guided() makes a new tensor)
            eps = guided(self.outputs["noise_pred"], self.guidance_scale) if self.use_cfg \
                else self.outputs["noise_pred"].clone()
            latent = scheduler.step(eps, t, latent, **noise_kwargs).prev_sample
            marks.append((index, int(t), used, fallback_from, start, self.clock.mark()))
            if on_step is not None and self.clock.torch_stream is None:
                on_step(self._event(marks[0][4], marks[-1]))
        return latent, marks

    def _call(self, index: int, precision: str) -> tuple[str, str | None]:
        """Step `index`'s engine call on the bound buffers; with a `call_memo`, an identical earlier call's output."""
        output = self.outputs["noise_pred"]
        memo = self.call_memo
        key = None if memo is None else memo.key(index, precision, self.inputs)
        if key is not None:
            kept = memo.lookup(key)
            if kept is not None:
                output.copy_(kept[0])
                return kept[1], kept[2]
        used, fallback_from = run_guarded(self.engines, precision, output, self.stream, label=f"step {index}",
                                          nan_guard=self.nan_guard, nvtx=self.nvtx, inputs=self.inputs)
        if key is not None:
            memo.store(key, output, used, fallback_from)
        return used, fallback_from

    def _event(self, origin, mark) -> StepEvent:
        index, t, used, fallback_from, start, end = mark
        return StepEvent(index, t, used, self.clock.seconds(origin, start), self.clock.seconds(start, end), fallback_from)

    def close(self) -> None:
        """Release the engines' bindings (a runner sharing them binds them again before its next call); engines the
        runner owns are freed."""
        with exclusive(self.engines.values(), "close"):  # never under another thread's call
            (close_engines if self.owns_engines else release)(self.engines.values())
        self.closed = True
