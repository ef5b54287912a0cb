"""The diffusers drop-in: a pipeline's `transformer` (or `unet`) replaced by tmpdiff engines that follow a schedule.

    pipe = PixArtSigmaPipeline.from_pretrained(path, transformer=None)   # the torch denoiser is never loaded
    denoiser = attach_engines(pipe, "build/pixart", schedule="schedule.json")
    image = pipe(prompt, num_inference_steps=denoiser.num_inference_steps).images[0]
    denoiser.trace  # what ran at each step

A schedule with custom timesteps (`tmpdiff.schedule/2`) is passed through, not refused: call the pipeline with
`timesteps=denoiser.timesteps` (None for other schedules, so that call fits every schedule). Attaching refuses a
pipeline whose call or scheduler cannot take them; a call that samples at other timesteps is refused at its
first denoiser call, before any engine runs. A schedule's learned time conditioning (MTEO rows, timestep shifts), and
the guidance scale a schedule calibrated inside a pipeline records, are checked against the run's guidance at attach
(the `guidance_scale` given, else the pipeline's default) and again at the first denoiser call of every pipeline
call: the call's scale where the pipeline exposes it, and the unconditional copy in the batch
(`EngineDenoiser._check_call_guidance`).

The pipeline's text encoders, VAE, scheduler and guidance run unchanged; only the denoiser call goes to the
engines. Each call looks up the scheduler's current step index and runs the engine the schedule names for
that step. The engines stay bound to one set of buffers owned here: the pipeline's tensors are copied in
(the pipeline owns its latents), the output is copied out (multistep schedulers keep earlier outputs).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tmpdiff.engines.base import TORCH_DTYPES, Engine
from tmpdiff.engines.loading import check_threads, load_plan_engines
from tmpdiff.engines.memory import check_fits
from tmpdiff.engines.streams import Stream, on_stream, runtime_stream
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import Manifest, load_manifest
from tmpdiff.formats.schedule import Schedule
from tmpdiff.formats.specs import TEXT_MASK, TensorSpec
from tmpdiff.models.adapter import DenoiserAdapter
from tmpdiff.models.schedulers import (
    inference_steps_for,
    plan_scheduler_for,
    scheduler_from,
    set_custom_timesteps,
    set_sampling_timesteps,
    shown_timesteps,
)
from tmpdiff.models.time_embedding_input import adapter_for_build
from tmpdiff.runtime.call_memo import CallMemo
from tmpdiff.runtime.dropin_drafts import DropInDrafts
from tmpdiff.runtime.engine_use import close_engines, ensure_bound, exclusive, release
from tmpdiff.runtime.parallel import ParallelMode
from tmpdiff.runtime.pipeline_io import DENOISER_COMPONENTS, default_guidance_of
from tmpdiff.runtime.plan import PrecisionPlan, resolve_plan
from tmpdiff.runtime.runner import run_guarded
from tmpdiff.runtime.time_conditioning import check_build, feed_time_conditioning
from tmpdiff.runtime.trace import RunTrace, StepClock, StepEvent, nvtx_wanted

# Keyword arguments a pipeline passes that carry attention-processor options: honoured only when empty.
PROCESSOR_OPTIONS = ("joint_attention_kwargs", "attention_kwargs", "cross_attention_kwargs")
# Config keys tmpdiff adds for export (fixed graph sizes); the model config itself does not have them.
TMPDIFF_CONFIG_KEYS = ("text_len", "sample_size", "time_ids")


class EngineDenoiser(torch.nn.Module):
    """Stands in for a diffusers denoiser module: same config, same call, engines underneath.

    The plan has one precision per scheduler step (len(scheduler.timesteps)), or one uniform precision that
    fits any step count.
    """

    def __init__(self, engines: Mapping[str, Engine], adapter: DenoiserAdapter, config: Mapping[str, Any],
                 forward_signature: inspect.Signature, scheduler_of, plan: PrecisionPlan, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, stream: Stream | None = None, nan_guard: bool = True,
                 nvtx: bool | None = None, memory_check: Callable[[int, int], None] | None = None,
                 owns_engines: bool = False) -> None:
        super().__init__()
        self.engines = dict(engines)
        self.owns_engines = owns_engines  # loaded for this denoiser (`denoiser_for_build`): `close` frees them
        self.adapter = adapter
        self.plan = plan
        self.nan_guard = nan_guard
        self.nvtx = nvtx_wanted() if nvtx is None else nvtx
        self._marks: list[tuple] = []  # (index, timestep, used, fallback_from, start mark, end mark) per call
        self._config = _frozen(config)
        self._signature = forward_signature
        self._scheduler_of = scheduler_of
        self._device = torch.device("cpu" if device == "cpu" else "cuda")
        self._dtype = dtype
        self.stream = stream or runtime_stream(device)
        self._clock = StepClock(getattr(self.stream, "torch", None))
        self._input_specs: list[TensorSpec] = adapter.input_specs()
        self._output_spec: TensorSpec = adapter.output_specs()[0]
        self._batch: int | None = None
        self._fresh_buffers = False  # new buffers the engines are not bound to yet
        self._memory_check = memory_check  # (rows, rows held): raises before a batch the memory cannot hold is bound
        self._held_rows = 0  # the largest batch bound so far (the engines' arenas keep its peak)
        self._matched_timesteps: torch.Tensor | None = None  # the scheduler's timesteps last found to be the plan's
        self._conditioned_timesteps: torch.Tensor | None = None  # last found to be the learned conditioning's
        self._call_timesteps: torch.Tensor | None = None  # the scheduler's timesteps of the current pipeline call
        self._scheduled_timesteps: torch.Tensor | None = None  # last found to be the recorded scheduler's
        self._calibrated_timesteps: list[list[float]] | None = None  # the recorded scheduler's (`calibrated_timesteps`)
        self._guided_timesteps: torch.Tensor | None = None  # the call whose guidance was last found to be the rows'
        self._call_thread: int | None = None  # the thread making the current pipeline call
        self._closed = False
        self._calls = 0  # denoiser calls of the current pipeline call (schedulers that keep no step index)
        self._first = 0  # and the step its first call made (img2img, inpainting, a refiner start partway)
        if config.get("addition_embed_type") == "text_time":
            # SDXL pipelines check their time ids against add_embedding's input width before the first step.
            width = int(config["projection_class_embeddings_input_dim"])
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self.drafts: DropInDrafts | None = None  # DRiffusion: set by `attach_engines(parallel=...)`
        self.draft_pool = None  # DRiffusion on Ray actors: a `dropin_ray.DraftPool` (`attach_draft_pool`)
        self.draft_pool_startup: float | None = None  # seconds its Ray start-up and engine loading took
        self.call_memo: CallMemo | None = None  # exhaustive walks: identical engine calls reused (`call_memo`)
        self.pipelines: weakref.WeakSet = weakref.WeakSet()  # the pipelines `attach_engines` attached it to

    # What diffusers pipelines read from their denoiser besides calling it.
    @property
    def config(self):
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def trace(self) -> RunTrace:
        """What ran at each denoiser call of the latest pipeline call (precision used, fallbacks, times)."""
        if self._clock.torch_stream is not None:
            self.stream.synchronize()  # CUDA event times are readable only once the work is done
        origin = self._marks[0][4] if self._marks else None
        return RunTrace([StepEvent(index, int(float(t)), used, self._clock.seconds(origin, start), self._clock.seconds(start, end),
                                   fallback) for index, t, used, fallback, start, end in self._marks])

    @property
    def steps(self) -> int | None:
        """The step count the schedule was made for (None for a uniform precision)."""
        return self.plan.steps

    @property
    def num_inference_steps(self) -> int | None:
        """The pipeline call's `num_inference_steps` for this schedule (None for a uniform precision): `steps` for most
        schedulers, one fewer for PNDM, which calls the denoiser twice at its first timestep."""
        scheduler = self._scheduler_of()
        if self.plan.steps is None or scheduler is None:
            return self.plan.steps
        return inference_steps_for(scheduler, self.plan.steps)

    @property
    def timesteps(self) -> list[int] | None:
        """The schedule's custom timesteps, to pass as the pipeline's `timesteps=` (None: the scheduler's spacing)."""
        return self.plan.timesteps

    def cache_context(self, name: str) -> contextlib.AbstractContextManager:
        """diffusers' cache hook (Flux calls it around cond/uncond): engines keep no cache, so a no-op."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any):
        """The denoiser call as the pipeline makes it; returns `(noise_pred,)` or an output with `.sample`."""
        try:
            call = dict(self._signature.bind(*args, **kwargs).arguments)
        except TypeError as exc:
            raise TmpdiffError(f"{self.adapter.architecture} engines called with unexpected arguments ({exc})") from None
        return_dict = call.pop("return_dict", True)
        self._require_open()
        self._check_caller()
        index, timestep = self._step(call.get("timestep"))
        feed_time_conditioning(call, index, self.plan.conditioning, getattr(self.adapter, "own_table", None),
                               f"step {index}")
        feeds = call_feeds(self._input_specs, call, self.adapter.architecture)
        hidden_name = self._input_specs[0].name
        hidden = feeds[hidden_name]
        self._check_call_guidance(hidden)
        self._ensure_buffers(int(hidden.shape[0]))
        result = None if self.drafts is None else self.drafts.take(index)
        if result is None and self.draft_pool is not None:
            result = self._anchor_with_pool(feeds, hidden_name, index, timestep, hidden.dtype)
        elif result is None:
            result = self._run(feeds, index, timestep, hidden.dtype)
            if self.drafts is not None:
                scheduler = self._scheduler_of()
                self.drafts.after_anchor(index, feeds, hidden_name, result, scheduler,
                                         lambda f, j: self._run(f, j, scheduler.timesteps[j], hidden.dtype))
        result = result.to(hidden.device)  # where the pipeline's latents are (CPU engines under a CUDA pipeline)
        if not return_dict:
            return (result,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=result)

    def _anchor_with_pool(self, feeds: dict[str, Any], hidden_name: str, index: int, timestep,
                          dtype: torch.dtype) -> torch.Tensor:
        """A round with its drafts on the Ray actors: aggressive drafts start before the anchor's own call (they
        need only the previous estimate), conservative ones after it; results in call order."""
        drafts, pool, scheduler = self.drafts, self.draft_pool, self._scheduler_of()
        early = drafts.mode is ParallelMode.aggressive
        calls = drafts.draft_calls(index, feeds, hidden_name, scheduler, None) if early else []
        start = self._clock.mark()
        handles = pool.submit(calls, scheduler.timesteps)
        result = self._run(feeds, index, timestep, dtype)
        if not early:
            calls = drafts.draft_calls(index, feeds, hidden_name, scheduler, result)
            start = self._clock.mark()
            handles = pool.submit(calls, scheduler.timesteps)
        outputs = pool.collect(handles)
        end = self._clock.mark()
        for (_, step), out in zip(calls, outputs, strict=True):  # the trace: each draft spans its round here
            self._marks.append((step, scheduler.timesteps[step], out.precision, out.fallback_from, start, end))
        drafts.accept(calls, [o.output.to(device=self._device, dtype=dtype) for o in outputs], result,
                      drafts.channels_of(feeds, hidden_name))
        return result

    def _check_caller(self) -> None:
        """A pipeline that holds this denoiser but was not attached to it (one made with diffusers' `from_pipe` shares
        the module, not the attachment) is refused: the denoiser would count steps on the attached pipeline's scheduler,
        and the per-call checks (scheduler, guidance) would not see its calls. The innermost pipeline call on the stack
        decides; an attached one is known by identity, so every denoiser call of a normal run reads no components."""
        found = _innermost_call(lambda owner: _attached(owner, self.pipelines) or _holds(owner, self))
        if found is None or _attached(found[0], self.pipelines):
            return
        caller = found[0]
        attached = sorted({type(pipe).__name__ for pipe in self.pipelines}) or ["no pipeline"]
        raise TmpdiffError(f"{type(caller).__name__} calls engines attached to another pipeline "
                           f"({', '.join(attached)}): it shares the module (diffusers' from_pipe), not the attachment, "
                           "and the denoiser follows the attached pipeline's scheduler; attach the build to this "
                           "pipeline too: attach_engines(pipe, build_dir, ...)")

    def _require_open(self) -> None:
        if self._closed:
            raise TmpdiffError("the attached engines were closed (denoiser.close()): attach the build again")

    def run_call(self, feeds: dict[str, Any], index: int, timestep: float) -> tuple[torch.Tensor, str, str | None, float]:
        """One call of step `index` on `feeds` (what a draft actor runs): output, engine used, fallback, seconds."""
        self._require_open()
        hidden = feeds[self._input_specs[0].name]
        self._ensure_buffers(int(hidden.shape[0]))
        started = time.perf_counter()
        result = self._run(feeds, index, timestep, hidden.dtype)
        self.stream.synchronize()
        _, _, used, fallback_from, _, _ = self._marks[-1]
        return result, used, fallback_from, time.perf_counter() - started

    def _run(self, feeds: dict[str, Any], index: int, timestep, dtype: torch.dtype) -> torch.Tensor:
        """One engine call of step `index` on `feeds` (the step's precision, NaN guard), recorded in the trace; with a
        `call_memo`, an identical earlier call's output instead (recorded with no engine time)."""
        precision = self.plan.at(index)
        memo = self.call_memo
        key = None if memo is None else memo.key(index, precision, feeds)
        if key is not None:
            kept = memo.lookup(key)
            if kept is not None:
                output, used, fallback_from = kept
                mark = self._clock.mark()
                self._marks.append((index, timestep, used, fallback_from, mark, mark))
                return output.to(dtype=dtype)
        # the lock before any work on the runtime stream: another thread's copies must not land in this call (or in a
        # CUDA graph an engine captures during it)
        with exclusive(self.engines.values(), f"step {index}"), on_stream(self.stream):
            # ordered after the pipeline's work on its stream, before what it does next
            for spec in self._input_specs:
                copy_into(spec, self._inputs[spec.name], feeds[spec.name], self.adapter)
            start = self._clock.mark()
            out = self._outputs[self._output_spec.name]
            ensure_bound(self, self.engines.values(), self._inputs, self._outputs, force=self._fresh_buffers)
            self._fresh_buffers = False
            used, fallback_from = run_guarded(self.engines, precision, out, self.stream, label=f"step {index}",
                                              nan_guard=self.nan_guard, nvtx=self.nvtx, inputs=self._inputs)
            result = out.to(dtype=dtype, copy=True)
        self._marks.append((index, timestep, used, fallback_from, start, self._clock.mark()))
        if key is not None:
            memo.store(key, result, used, fallback_from)
        return result

    def _ensure_buffers(self, batch: int) -> None:
        """Buffers for this batch size, bound to every engine at the next call (`_run`, under the engines' lock: once per
        batch size, not per step; engines shared with another denoiser or runner are bound again before each call)."""
        if batch == self._batch:
            return
        if self._memory_check is not None and batch > self._held_rows:
            self._memory_check(batch, self._held_rows)
        dims = self.adapter.default_dims(batch)
        self._inputs = {s.name: torch.zeros(s.concrete(dims), dtype=TORCH_DTYPES[s.dtype], device=self._device)
                        for s in self._input_specs}
        self._outputs = {s.name: torch.zeros(s.concrete(dims), dtype=TORCH_DTYPES[s.dtype], device=self._device)
                         for s in self.adapter.output_specs()}
        self._fresh_buffers = True
        self._batch = batch
        self._held_rows = max(self._held_rows, batch)

    def _step(self, called_at: Any = None) -> tuple[int, torch.Tensor]:
        """The scheduler's current step index (checked against the schedule) and its timestep; `called_at` is the
        timestep argument of the call."""
        scheduler = self._scheduler_of()
        timesteps = scheduler.timesteps
        if timesteps is None:
            raise TmpdiffError("the pipeline's scheduler has no timesteps set")
        self._follow_call(timesteps, scheduler)
        self._check_custom_timesteps(timesteps)
        self._check_conditioning_timesteps(timesteps)
        if self.plan.steps is not None and len(timesteps) != self.plan.steps:
            raise TmpdiffError(f"the schedule has {self.plan.steps} steps (one per denoiser call) but the pipeline makes "
                               f"{len(timesteps)} calls: call it with num_inference_steps="
                               f"{inference_steps_for(scheduler, self.plan.steps)}")
        self._check_call_scheduler(scheduler, timesteps)
        if hasattr(scheduler, "step_index"):
            index = scheduler.step_index
            if index is None:  # set by the scheduler's first step(); before that, the run starts at begin_index
                index = scheduler.begin_index or 0
        else:  # DDIM, DDPM, PNDM keep no step index: count the calls since set_timesteps made new timesteps, from the
            # step the first call's timestep stands at (a pipeline that starts partway runs timesteps[t_start:])
            if self._calls == 0:
                self._first = self._first_position(timesteps, called_at)
            index, self._calls = self._first + self._calls, self._calls + 1
        if not 0 <= index < len(timesteps):
            raise TmpdiffError(f"scheduler step index {index} is outside its {len(timesteps)} timesteps")
        return index, timesteps[index]  # a 0-d tensor, read as a number only when the trace is asked for

    def _first_position(self, timesteps: torch.Tensor, called_at: Any) -> int:
        """The step the first denoiser call of a pipeline call makes, for a scheduler that keeps no step index: where its
        timestep stands in the scheduler's timesteps, or, when that value stands there more than once (PNDM repeats
        one), where the pipeline's own sliced `timesteps` start (img2img runs `timesteps[t_start * order:]`)."""
        places = _places(timesteps, called_at)
        if places is None or len(places) < 2:
            return _position(timesteps, called_at)
        found = running_call(self.pipelines)
        sliced = None if found is None else found[1].get("timesteps")
        if isinstance(sliced, torch.Tensor) and 0 < len(sliced) <= len(timesteps):
            first = len(timesteps) - len(sliced)
            if torch.equal(timesteps[first:].cpu(), sliced.cpu()):
                return first
        raise TmpdiffError(f"the first denoiser call is at timestep {float(timesteps[places[0]]):g}, which the "
                           f"scheduler's timesteps hold more than once ({type(self._scheduler_of()).__name__}), and the "
                           "pipeline call's own timesteps are not readable: which step it makes is not known; use a "
                           "scheduler without repeated timesteps (e.g. DDIMScheduler)")

    def _follow_call(self, timesteps: torch.Tensor, scheduler: Any = None) -> None:
        """A pipeline call sets new timesteps: the trace (and DRiffusion's drafts) start again, and the call belongs to
        the calling thread; a step from another thread meanwhile is refused (its pipeline shares this call's state).
        New timesteps on a scheduler that has already stepped were set by another thread during a call (a call sets
        them before its first step): both calls are refused from then on, neither runs on the other's state."""
        thread = threading.get_ident()
        if timesteps is not self._call_timesteps:
            index = getattr(scheduler, "step_index", None)
            if index is not None and index != (getattr(scheduler, "begin_index", None) or 0):
                self._call_timesteps, self._call_thread = timesteps, None  # no thread owns this call: all refused
                raise TmpdiffError("the pipeline's scheduler was reset during a call (another thread started a call "
                                   "on the same pipeline): both calls are refused; attach one pipeline per thread")
            self._call_timesteps, self._call_thread, self._marks, self._calls = timesteps, thread, [], 0
            if self.drafts is not None:
                self.drafts.reset()
        elif thread != self._call_thread:
            raise TmpdiffError("the attached pipeline is in a call from another thread: a pipeline runs one call at a "
                               "time (diffusers pipelines keep their scheduler's state); attach one pipeline per thread")

    def _check_custom_timesteps(self, timesteps: torch.Tensor) -> None:
        """With a schedule's custom timesteps, the pipeline must sample at exactly those (read once per pipeline call)."""
        wanted = self.plan.timesteps
        if wanted is None or timesteps is self._matched_timesteps:
            return
        ran = [float(t) for t in timesteps.tolist()]
        if ran != [float(t) for t in wanted]:
            raise TmpdiffError(f"the schedule samples at its own {len(wanted)} timesteps but the pipeline runs {len(ran)} "
                               f"at {shown_timesteps(ran)}: call it with timesteps=denoiser.timesteps", self.plan.source)
        self._matched_timesteps = timesteps

    def _check_call_scheduler(self, scheduler, timesteps: torch.Tensor) -> None:
        """A schedule that records its scheduler, at the first denoiser call of each pipeline call: the scheduler must
        still be that class and noise process (`pipe.scheduler` may have been replaced since attach), and without
        custom timesteps of its own the call must sample at that scheduler's own timesteps for the schedule's step
        count (a call given other `timesteps=` or `sigmas=` would run precisions chosen for other timesteps)."""
        if self.plan.file is None or self.plan.file.scheduler is None or timesteps is self._scheduled_timesteps:
            return
        check_plan_scheduler(self.plan, scheduler)
        if self._calibrated_timesteps is None:
            self._calibrated_timesteps = calibrated_timesteps(self.plan) or []
        ran = [float(t) for t in timesteps.tolist()]
        if self._calibrated_timesteps and not any(
                len(ran) == len(want) and all(abs(a - b) <= 1e-3 for a, b in zip(ran, want, strict=True))
                for want in self._calibrated_timesteps):
            raise TmpdiffError(f"the schedule was calibrated with {self.plan.file.scheduler.class_name}'s own "
                               f"{self.plan.steps} timesteps ({shown_timesteps(self._calibrated_timesteps[0])}), this "
                               f"pipeline call samples at {shown_timesteps(ran)}: call it with num_inference_steps="
                               f"{inference_steps_for(scheduler, self.plan.steps)} and no timesteps= or sigmas=, or "
                               "re-calibrate at these timesteps", self.plan.source)
        self._scheduled_timesteps = timesteps

    def _check_conditioning_timesteps(self, timesteps: torch.Tensor) -> None:
        """Learned time embeddings or shifts run at the timesteps they were learned for (read once per pipeline call)."""
        conditioning = self.plan.conditioning
        if conditioning is None or timesteps is self._conditioned_timesteps:
            return
        ran = [float(t) for t in timesteps.tolist()]
        if not all(t.is_integer() for t in ran):
            raise TmpdiffError(f"the pipeline samples at non-integer timesteps ({ran[0]:g}, ...); the learned time "
                               "conditioning is for integer ones", conditioning.path)
        conditioning.check_solver(self._scheduler_of())
        conditioning.check_timesteps([int(t) for t in ran])
        self._conditioned_timesteps = timesteps

    def _check_call_guidance(self, hidden: Any) -> None:
        """Learned rows, and a schedule calibrated inside a pipeline, run at the guidance they were learned or
        calibrated with, checked at the first denoiser call of each pipeline call, before any engine runs (attaching
        checked only the scale given to `attach_engines`, or the pipeline's default): the running call's scale where
        the pipeline exposes it (`running_guidance`), and a batch that holds classifier-free guidance's unconditional
        copy where the rows or the schedule were made with it (diffusers turns guidance off at guidance_scale <= 1;
        for the schedule, read only where the pipeline exposes no scale). A denoiser called outside an attached
        pipeline's call is not checked here."""
        conditioning = self.plan.conditioning
        calibrated = calibrated_guidance(self.plan)
        if (conditioning is None and calibrated is None) or self._guided_timesteps is self._call_timesteps:
            return
        found = running_call(self.pipelines)
        if found is not None:
            pipe, arguments = found
            scale = running_guidance(pipe, arguments)
            guided = guided_batch(hidden)
            if conditioning is not None:
                if scale is not None:
                    conditioning.check_guidance(scale)
                conditioning.check_guided_batch(guided)
            check_calibrated_guidance(self.plan, scale, guided=guided)
        self._guided_timesteps = self._call_timesteps

    def close(self) -> None:
        """Release the engines' bindings, freeing engines loaded for this denoiser (and DRiffusion's Ray actors); later
        calls are refused."""
        with exclusive(self.engines.values(), "close"):  # never under another thread's call
            self._closed = True
            if self.draft_pool is not None:
                self.draft_pool.close()
                self.draft_pool = None
            (close_engines if self.owns_engines else release)(self.engines.values())


def call_feeds(input_specs: list[TensorSpec], call: dict[str, Any], architecture: str) -> dict[str, Any]:
    """Each graph input from a denoiser call's bound arguments (or its `added_cond_kwargs`); anything else it passes
    must be empty."""
    added = dict(call.pop("added_cond_kwargs", None) or {})
    feeds: dict[str, Any] = {}
    for spec in input_specs:
        value = call.pop(spec.name, None)
        if value is None:
            value = added.pop(spec.name, None)
        if value is None and spec.name == TEXT_MASK:
            value = 1.0  # no mask given: every token counts
        if value is None:
            raise TmpdiffError(f"the pipeline did not pass {spec.name!r}, which the {architecture} engines take")
        feeds[spec.name] = value
    unused = [name for name, value in {**call, **added}.items()
              if value is not None and not (name in PROCESSOR_OPTIONS and not value)]
    if unused:
        raise TmpdiffError(f"the {architecture} engines cannot take {', '.join(sorted(unused))} "
                           "(not part of the exported graph)")
    return feeds


def _innermost_call(wanted: Callable[[Any], bool]) -> tuple[Any, Mapping[str, Any]] | None:
    """The innermost `__call__` in progress on this thread's stack whose `self` is `wanted`, with its local variables
    (its arguments among them); None when there is none."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "__call__":
                owner = frame.f_locals.get("self")
                if owner is not None and wanted(owner):
                    return owner, frame.f_locals
            frame = frame.f_back
        return None
    finally:
        del frame


def running_call(pipes) -> tuple[Any, Mapping[str, Any]] | None:
    """The innermost `__call__` in progress of one of `pipes`, with its local variables; None when the denoiser is
    called from elsewhere."""
    return _innermost_call(lambda owner: _attached(owner, pipes))


def _attached(owner: Any, pipes) -> bool:
    return any(owner is pipe for pipe in pipes)


def _holds(owner: Any, denoiser: torch.nn.Module) -> bool:
    """Whether `owner` is a pipeline holding `denoiser` among its components (diffusers' `components`, what
    `attach_engines` reads): a wrapper or sampling loop that keeps the module under a denoiser's name is not one."""
    try:  # any object's __call__ is on the stack; its attributes are not ours to trust
        components = getattr(owner, "components", None)
    except Exception:  # noqa: BLE001
        return False
    return isinstance(components, Mapping) and any(components.get(name) is denoiser for name in DENOISER_COMPONENTS)


def running_guidance(pipe, arguments: Mapping[str, Any]) -> float | None:
    """The guidance scale of a pipeline call in progress: what the pipeline set for it before its denoising loop
    (`_guidance_scale`: SD3, SDXL, Flux, ...), else the call's `guidance_scale` argument (PixArt, DiT, SD 1.x keep it a
    local); None when the pipeline exposes neither (the scale given at attach was checked then)."""
    for value in (getattr(pipe, "_guidance_scale", None), arguments.get("guidance_scale")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value)
    return None


def guided_batch(hidden: Any) -> bool:
    """Whether a denoiser call's latents hold classifier-free guidance's copies: diffusers pipelines guide by calling
    the denoiser once on `torch.cat([latents] * 2)` (x3 with perturbed-attention guidance), so the batch splits into
    identical parts."""
    latents = torch.as_tensor(hidden)
    rows = int(latents.shape[0]) if latents.dim() else 0
    for parts in (2, 3):
        if rows >= parts and rows % parts == 0:
            chunks = latents.chunk(parts)
            if all(torch.equal(chunks[0], chunk) for chunk in chunks[1:]):
                return True
    return False


def _frozen(config: Mapping[str, Any]):
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(config)


def copy_into(spec: TensorSpec, buffer: torch.Tensor, value: Any, adapter: DenoiserAdapter) -> None:
    """Write one call argument into its bound buffer; only per-sample scalars (timestep, guidance) broadcast."""
    if isinstance(value, (int, float)) and (len(spec.shape) == 1 or spec.name == TEXT_MASK):
        buffer.fill_(value)  # a Python number goes to the kernel as an argument: no host-to-device copy
        return
    tensor = torch.as_tensor(value, device=buffer.device)
    per_sample_scalar = len(spec.shape) == 1 and isinstance(spec.shape[0], str)
    if (per_sample_scalar and tensor.numel() == 1) or (spec.name == TEXT_MASK and tensor.dim() == 0):
        buffer.copy_(tensor.reshape(()).expand(buffer.shape))  # on the device: .item() would synchronise
        return
    if tuple(tensor.shape) != tuple(buffer.shape):
        hint = ""
        if spec.name == "encoder_hidden_states" and adapter.architecture == "UNet2DConditionModel":
            hint = (f" (the graph was exported for {adapter.text_len} text tokens, the pipeline passes {tensor.shape[1]}: "
                    f"Stable Diffusion pipelines pad to their CLIP tokenizer's length, so re-export with --text-len "
                    f"{tensor.shape[1]})")
        elif spec.name == "encoder_hidden_states":
            hint = (f" (the graph was exported for {adapter.text_len} text tokens: call the pipeline with "
                    f"max_sequence_length to match, or re-export with --text-len)")
        elif spec.name in ("hidden_states", "sample"):
            hint = " (the graph's latent size is fixed at export: pass the matching height and width)"
        raise TmpdiffError(f"{spec.name} has shape {tuple(tensor.shape)}, the engines take {tuple(buffer.shape)}{hint}")
    buffer.copy_(tensor)


def denoiser_component(pipe) -> str:
    """Which attribute of the pipeline holds the denoiser."""
    components = getattr(pipe, "components", {})
    for name in DENOISER_COMPONENTS:
        if name in components:
            return name
    raise TmpdiffError(f"{type(pipe).__name__} has no {' or '.join(DENOISER_COMPONENTS)} component")


def check_same_model(original: torch.nn.Module, manifest: Manifest, build_dir: Path) -> None:
    """The pipeline's own denoiser (when loaded) must be the model the build directory was exported from."""
    if type(original).__name__ != manifest.architecture:
        raise TmpdiffError(f"the pipeline's denoiser is a {type(original).__name__}, the build directory holds "
                           f"{manifest.architecture} engines", build_dir / "manifest.json")
    exported = manifest.denoiser_config
    differing = sorted(k for k, v in dict(original.config).items()
                       if not k.startswith("_") and k not in TMPDIFF_CONFIG_KEYS and k in exported
                       and _plain(exported[k]) != _plain(v))
    if differing:
        key = differing[0]
        raise TmpdiffError(f"the pipeline's denoiser config differs from the exported one in {', '.join(differing)} "
                           f"({key}: {exported[key]!r} exported, {dict(original.config)[key]!r} here)",
                           build_dir / "manifest.json")


def _plain(value: Any) -> Any:
    """A config value as the manifest's JSON holds it (tuples, nested too, become lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _forward_signature(architecture: str) -> inspect.Signature:
    import diffusers

    cls = getattr(diffusers, architecture)
    parameters = list(inspect.signature(cls.forward).parameters.values())[1:]  # drop self
    return inspect.Signature(parameters)


def _denoiser_config(manifest: Manifest, adapter: DenoiserAdapter) -> dict[str, Any]:
    """The config the pipeline will read; out_channels says what the graph returns (eps only for learned-sigma models)."""
    config = {k: v for k, v in manifest.denoiser_config.items() if not k.startswith("_")}
    output = adapter.output_specs()[0]
    if len(output.shape) == 4 and isinstance(output.shape[1], int):
        config["out_channels"] = output.shape[1]
    return config


def calibrated_guidance(plan: PrecisionPlan) -> float | None:
    """The guidance scale a schedule calibrated inside a pipeline was calibrated at, or a TMPQ-DM plan searched inside
    one was searched at (None: not recorded; plans searched before 2026-12-07 record none for the pipeline's default)."""
    if plan.tmpq is not None:
        scale = (plan.tmpq.measured.get("calibration") or {}).get("guidance_scale")
    else:
        scale = None if plan.file is None else plan.file.target.get("guidance_scale")
    return None if scale is None else float(scale)


def _made(plan: PrecisionPlan) -> str:
    return "plan was searched" if plan.tmpq is not None else "schedule was calibrated"


def check_calibrated_guidance(plan: PrecisionPlan, used: float | None, *, guided: bool | None = None) -> None:
    """A schedule calibrated inside a pipeline runs with the guidance scale it was calibrated with (`used`: the run's,
    None when the pipeline takes none or exposes none): another changes every step's error, so the schedule's figures
    would not hold. At a pipeline call whose scale is not exposed, `guided` (its denoiser batch holds classifier-free
    guidance's unconditional copy) refuses a schedule calibrated with guidance on (above 1) run without it."""
    scale = calibrated_guidance(plan)
    if scale is None:
        return
    if used is not None and abs(scale - used) > 1e-9:
        raise TmpdiffError(f"the {_made(plan)} at guidance scale {scale:g}, this run would use {used:g}: "
                           f"run at {scale:g} (--guidance; in Python guidance_scale= to attach_engines and the pipeline "
                           f"call) or recalibrate at {used:g}", plan.source)
    if used is None and guided is False and scale > 1:
        raise TmpdiffError(f"the {_made(plan)} at guidance scale {scale:g}, this pipeline call runs without "
                           f"classifier-free guidance (no unconditional copy in its denoiser batch: guidance_scale <= 1 "
                           f"turns guidance off): call it with guidance_scale={scale:g}", plan.source)


def check_plan_scheduler(plan: PrecisionPlan, scheduler) -> None:
    """A schedule that records the scheduler it was calibrated with runs with that class and noise process (checked
    at attach and again at each pipeline call: `pipe.scheduler` may be replaced in between)."""
    if plan.file is None or plan.file.scheduler is None:
        return
    ours, theirs = plan.file.scheduler.class_name, type(scheduler).__name__
    if ours != theirs:
        raise TmpdiffError(f"the schedule was calibrated with {ours}, the pipeline samples with {theirs}: set "
                           f"pipe.scheduler = {ours}.from_config(pipe.scheduler.config) or re-calibrate", plan.source)
    plan_scheduler_for(plan.file, scheduler, plan.source)  # refuses another model's noise process


def calibrated_timesteps(plan: PrecisionPlan) -> list[list[float]] | None:
    """The timesteps a schedule that records its scheduler (and no timesteps of its own) was calibrated at: that
    scheduler's own spacing for the schedule's step count, and for flow-matching schedulers also FluxPipeline's
    (sigmas 1 .. 1/steps, what Flux pipelines pass). None when not known: no recorded scheduler, custom timesteps
    (checked by `_check_custom_timesteps`), or dynamic shifting (the timesteps depend on the pipeline's `mu`)."""
    ref = None if plan.file is None else plan.file.scheduler
    if ref is None or plan.timesteps is not None or plan.steps is None:
        return None
    scheduler = scheduler_from(ref.class_name, ref.config, plan.source)
    if scheduler.config.get("use_dynamic_shifting"):
        return None
    set_sampling_timesteps(scheduler, plan.steps)
    spacings = [[float(t) for t in scheduler.timesteps]]
    if ref.class_name.startswith("FlowMatch"):
        import numpy as np

        flux = scheduler_from(ref.class_name, ref.config, plan.source)
        flux.set_timesteps(sigmas=np.linspace(1.0, 1 / plan.steps, plan.steps).tolist())
        spacings.append([float(t) for t in flux.timesteps])
    return spacings


def check_takes_timesteps(pipe, plan: PrecisionPlan) -> None:
    """A schedule's custom timesteps need a pipeline call with `timesteps=` and a scheduler that samples at them."""
    if "timesteps" not in inspect.signature(type(pipe).__call__).parameters:
        raise TmpdiffError(f"the schedule names its timesteps but {type(pipe).__name__} takes no timesteps=", plan.source)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # a copy: the pipeline's own stays untouched
    set_custom_timesteps(scheduler, plan.timesteps, plan.source)


def attach_engines(pipe, build_dir: str | Path, *, schedule: PrecisionPlan | Schedule | str | Path | list[str] | None = None,
                   precision: str | None = None, backend: str = "ort", device: str = "cpu", threads: int | None = None,
                   nan_guard: bool = True, parallel: int = 1, mode: str = "conservative",
                   guidance_scale: float | None = None, min_alpha: float = 0.0) -> EngineDenoiser:
    """Replace the pipeline's transformer/unet with engines from `build_dir` that follow `schedule`.

    Every built engine of the backend is loaded (a NaN step falls back to the next higher precision); the
    schedule's precisions must all be built. The pipeline may have been loaded without its denoiser
    (`transformer=None`): config and call signature then come from the build directory. With `parallel` N > 1 the
    denoiser drafts ahead (DRiffusion, `dropin_drafts`) in `mode`, from anchors whose signal scale is at least
    `min_alpha`; `guidance_scale` must be the one the pipeline is called with (default: the pipeline's). Learned
    time conditioning and the guidance scale a calibrated schedule records are checked against it here, and at each
    pipeline call against the call's own scale where the pipeline exposes one (`running_guidance`; where it exposes
    none, only against this one) and against a batch without classifier-free guidance's copy.
    `dropin_ray.attach_with_ray_drafts` runs the drafts on Ray actors.
    """
    denoiser, original = prepare_engines(pipe, build_dir, schedule=schedule, precision=precision, backend=backend,
                                         device=device, threads=threads, nan_guard=nan_guard, parallel=parallel,
                                         mode=mode, guidance_scale=guidance_scale, min_alpha=min_alpha)
    swap_in(pipe, denoiser, original)
    return denoiser


def prepare_engines(pipe, build_dir: str | Path, *,
                    schedule: PrecisionPlan | Schedule | str | Path | list[str] | None = None,
                    precision: str | None = None, backend: str = "ort", device: str = "cpu",
                    threads: int | None = None, nan_guard: bool = True, parallel: int = 1, mode: str = "conservative",
                    guidance_scale: float | None = None, min_alpha: float = 0.0) -> tuple[EngineDenoiser, Any]:
    """`attach_engines`' checks and denoiser, the pipeline left untouched: the denoiser and the pipeline's current one
    (for `swap_in`; close the denoiser instead when it is not swapped in)."""
    build_dir = Path(build_dir)
    check_threads(threads)
    manifest = load_manifest(build_dir)
    plan = schedule if isinstance(schedule, PrecisionPlan) else resolve_plan(schedule, precision)
    plan.check_model(manifest)
    scale = guidance_scale if guidance_scale is not None else default_guidance_of(type(pipe))  # what the calls use
    if plan.conditioning is not None:  # learned rows: for these graphs and this guidance (timesteps: at the 1st call)
        check_build(plan.conditioning, manifest, build_dir)
        plan.conditioning.check_guidance(1.0 if scale is None else float(scale))
    check_plan_scheduler(plan, pipe.scheduler)
    if plan.timesteps is not None:
        check_takes_timesteps(pipe, plan)
    check_calibrated_guidance(plan, scale)
    component = denoiser_component(pipe)
    original = getattr(pipe, component, None)
    dtype = original.dtype if original is not None else torch.float32
    if original is not None and not isinstance(original, EngineDenoiser):  # attached before: replaced (closed) in swap_in
        check_same_model(original, manifest, build_dir)
    denoiser = denoiser_for_build(build_dir, plan, backend=backend, device=device, threads=threads, nan_guard=nan_guard,
                                  scheduler_of=lambda: pipe.scheduler, dtype=dtype, manifest=manifest)
    if parallel > 1:
        try:
            denoiser.drafts = _drop_in_drafts(pipe, plan, manifest, denoiser.adapter, parallel, mode, scale, min_alpha)
        except BaseException:
            denoiser.close()  # its engines were loaded for it
            raise
    return denoiser, original


def swap_in(pipe, denoiser: EngineDenoiser, original: Any) -> None:
    """Put `denoiser` (from `prepare_engines`) in the pipeline in place of `original`, closing an `EngineDenoiser`
    no other pipeline calls."""
    component = denoiser_component(pipe)
    setattr(pipe, component, denoiser)
    denoiser.pipelines.add(pipe)
    if isinstance(original, EngineDenoiser):
        # closed unless a pipeline it was attached to still calls it (this one shared through diffusers' `from_pipe`)
        original.pipelines.discard(pipe)
        if not any(getattr(other, component, None) is original for other in original.pipelines):
            original.close()
    if hasattr(pipe, "_is_unet_config_sample_size_int"):  # StableDiffusionPipeline decides this from the UNet it was
        # loaded with (None here), then indexes an int sample_size when no height and width are passed
        pipe._is_unet_config_sample_size_int = isinstance(denoiser.config.sample_size, int)


# pipelines whose classifier-free-guidance batch puts the conditional half first (diffusers' others: unconditional first)
COND_FIRST_PIPELINES = frozenset({"DiTPipeline"})


def _drop_in_drafts(pipe, plan: PrecisionPlan, manifest: Manifest, adapter: DenoiserAdapter, parallel: int, mode: str,
                    scale: float | None, min_alpha: float) -> DropInDrafts:
    """DRiffusion's drafts for an attached pipeline, refused where they cannot run."""
    from tmpdiff.runtime.parallel import check_parallel_scheduler

    check_parallel_scheduler(pipe.scheduler)
    if plan.conditioning is not None:  # a drafted call would get the anchor's conditioning, not its step's
        raise TmpdiffError("--parallel drafts in a pipeline do not feed learned time conditioning (the "
                           "class-conditional runner's workers do): run this plan sequentially", plan.source)
    if "timestep" not in {spec.name for spec in adapter.input_specs()}:
        raise TmpdiffError(f"--parallel drafts need a timestep input; {manifest.architecture} graphs have none")
    return DropInDrafts(parallel, mode, 1.0 if scale is None else float(scale), min_alpha,
                        cond_first=type(pipe).__name__ in COND_FIRST_PIPELINES)


def denoiser_for_build(build_dir: Path, plan: PrecisionPlan, *, backend: str = "ort", device: str = "cpu",
                       threads: int | None = None, nan_guard: bool = True, scheduler_of=lambda: None,
                       dtype: torch.dtype = torch.float32, manifest: Manifest | None = None) -> EngineDenoiser:
    """An `EngineDenoiser` of a build's engines for `plan` (the pipeline's, or a draft actor's)."""
    build_dir = Path(build_dir)
    manifest = manifest or load_manifest(build_dir)
    adapter = adapter_for_build(build_dir, manifest)  # wrapped when the graphs take time embeddings
    engines = load_plan_engines(build_dir, manifest, backend, device, plan.needed, threads)  # + deployed `mixed-...`
    what = "request (fewer prompts or images per prompt)"
    return engine_denoiser(engines, manifest, adapter, plan, scheduler_of=scheduler_of, device=device, dtype=dtype,
                           nan_guard=nan_guard, owns_engines=True,
                           memory_check=lambda rows, held: check_fits(manifest, rows, backend, device, what, held))


def engine_denoiser(engines: Mapping[str, Engine], manifest: Manifest, adapter: DenoiserAdapter, plan: PrecisionPlan, *,
                    scheduler_of=lambda: None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                    nan_guard: bool = True, memory_check: Callable[[int, int], None] | None = None,
                    owns_engines: bool = False) -> EngineDenoiser:
    """An `EngineDenoiser` over given engines: a build's, or torch engines standing in for them (a search's
    candidates), keyed by the names `plan` runs; `memory_check(rows, rows held)` refuses a batch too large;
    `owns_engines`: `close` frees them."""
    return EngineDenoiser(engines, adapter, _denoiser_config(manifest, adapter), _forward_signature(manifest.architecture),
                          scheduler_of, plan, device=device, dtype=dtype, nan_guard=nan_guard, memory_check=memory_check,
                          owns_engines=owns_engines)


def _position(timesteps: torch.Tensor, called_at: Any) -> int:
    """Where a call's timestep argument (a number, a 0-d tensor or one per batch row) first stands in the scheduler's
    timesteps; 0 when it is not given, refused when it is not there."""
    places = _places(timesteps, called_at)
    if places is None:
        return 0
    if not places:  # starting at step 0 would run every step at another step's precision
        value = float(torch.as_tensor(called_at).flatten()[0])
        raise TmpdiffError(f"the first denoiser call is at timestep {value:g}, which is not among the scheduler's "
                           f"timesteps ({shown_timesteps(timesteps.tolist())}): which step it makes is not known")
    return places[0]


def _places(timesteps: torch.Tensor, called_at: Any) -> list[int] | None:
    """Every index of the scheduler's timesteps at which a call's timestep argument (its first value) stands; None
    when it is not given."""
    values = torch.as_tensor(called_at if called_at is not None else []).flatten()
    if values.numel() == 0:
        return None
    close = torch.isclose(timesteps.float().cpu(), values[0].float().cpu(), rtol=0, atol=1e-3)
    return torch.nonzero(close).flatten().tolist()
