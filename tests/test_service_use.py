"""The runtime inside a long-lived service: engines shared by runners and pipelines, calls from several threads, the
trace of every call, closing and re-attaching, and non-finite requests."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import T2I_PROMPTS
from tmpdiff.engines.loading import load_engines
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.models.tiny_t2i import t2i_dir
from tmpdiff.runtime.dropin import attach_engines
from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise

SCHEDULE = ["fp32", "int8", "int8", "fp32"]


def _runners(build_dir, batches):
    """Runners of the given batch sizes over one set of engines (loaded once, as a service does)."""
    manifest = load_manifest(build_dir)
    s = manifest.sampling
    engines = load_engines(build_dir, manifest, "ort", "cpu", ["fp32", "int8"])
    return s, [ScheduledRunner(engines, b, s.channels, s.image_size, s.guidance_scale, s.null_class, s.num_classes)
               for b in batches]


def _sample(runner, s, labels, seed=0, on_step=None):
    noise = initial_noise(len(labels), s.channels, s.image_size, seed)
    return runner.sample(sampling_scheduler(s), torch.tensor(labels), noise, SCHEDULE, on_step=on_step).latents


def test_runners_sharing_engines_each_get_their_own_results(quant_build):
    """Engines bind to one runner's buffers at a time: each runner binds them back before its call."""
    _, build_dir, _ = quant_build
    s, (small, large) = _runners(build_dir, [2, 4])
    first = _sample(small, s, [0, 1])
    _sample(large, s, [2, 3, 4, 5])
    again = _sample(small, s, [0, 1])
    assert torch.equal(first, again)
    large.close()  # releases the bindings: the other runner binds them again
    assert torch.equal(_sample(small, s, [0, 1]), first)


def test_closing_a_runner_unbinds_shared_engines_and_leaves_them_loaded():
    """`release` (a runner's or denoiser's close) unbinds; it never closes: a TensorRT engine closed there would be
    freed under the other runners sharing it."""
    from tmpdiff.runtime.engine_use import ensure_bound, release

    class Recorder:
        precision, device = "fp32", "cpu"
        input_specs = output_specs = []

        def __init__(self) -> None:
            self.calls: list[str] = []

        def bind(self, inputs, outputs) -> None:
            self.calls.append("bind")

        def unbind(self) -> None:
            self.calls.append("unbind")

        def close(self) -> None:
            self.calls.append("close")

    engine, owner = Recorder(), Recorder()  # any object that takes a weak reference
    ensure_bound(owner, [engine], {}, {})
    release([engine])
    ensure_bound(owner, [engine], {}, {})  # bound again by whoever runs it next
    assert engine.calls == ["bind", "unbind", "bind"]
    # a runner frees only engines loaded for it (`owns_engines`: run, calibrate, a worker, an attached pipeline)
    shared, own = Recorder(), Recorder()
    ScheduledRunner.close(SimpleNamespace(engines={"fp32": shared}, owns_engines=False))
    ScheduledRunner.close(SimpleNamespace(engines={"fp32": own}, owns_engines=True))
    assert shared.calls == ["unbind"] and own.calls == ["unbind", "close"]


def test_gpu_engines_of_a_process_run_one_call_at_a_time():
    """GPU engines share the process's CUDA stream and TensorRT activation memory: while one thread's call runs GPU
    engines, another thread's call on other GPU engines (loaded apart) is refused too; CPU engine sets run apart."""
    from tmpdiff.runtime.engine_use import exclusive

    class On:
        def __init__(self, device: str) -> None:
            self.device = device

    gpu_a, gpu_b, cpu_a, cpu_b = [On("cuda:0")], [On("cuda:0")], [On("cpu")], [On("cpu")]
    for mine, theirs, refused in ((gpu_a, gpu_b, True), (cpu_a, cpu_b, False)):
        inside, release = threading.Event(), threading.Event()

        def hold(engines=mine, inside=inside, release=release) -> None:
            with exclusive(engines, "first"):
                inside.set()
                release.wait(60)

        worker = threading.Thread(target=hold)
        worker.start()
        assert inside.wait(60)
        try:
            if refused:
                with pytest.raises(TmpdiffError, match="GPU engines of this process are running another call"):
                    with exclusive(theirs, "second"):
                        pass
            else:
                with exclusive(theirs, "second"):
                    pass
        finally:
            release.set()
            worker.join(60)
    with exclusive(gpu_b, "after"):  # released with the first call
        with exclusive(gpu_a, "nested"):  # a call inside a call in one thread is ordered, not concurrent
            pass


def test_a_second_thread_on_engines_in_use_is_refused(quant_build):
    """While one call runs the engines, another thread's call on them is refused (never interleaved), and the first
    call's result is unaffected."""
    _, build_dir, _ = quant_build
    s, (mine, theirs) = _runners(build_dir, [2, 2])
    reference = _sample(mine, s, [0, 1])
    inside, release = threading.Event(), threading.Event()
    result: dict = {}

    def hold(event) -> None:
        if event.index == 1:
            inside.set()
            release.wait(60)

    worker = threading.Thread(target=lambda: result.setdefault("latents", _sample(mine, s, [0, 1], on_step=hold)))
    worker.start()
    assert inside.wait(60)
    try:
        with pytest.raises(TmpdiffError, match="running another call .* one call at a time"):
            _sample(theirs, s, [2, 3])
        with pytest.raises(TmpdiffError, match="running another call"):
            _sample(mine, s, [0, 1])
    finally:
        release.set()
        worker.join(60)
    assert torch.equal(result["latents"], reference)
    _sample(theirs, s, [2, 3])  # free again


def test_non_finite_requests_are_named_not_blamed_on_an_engine(quant_build):
    _, build_dir, _ = quant_build
    s, (runner,) = _runners(build_dir, [2])
    noise = initial_noise(2, s.channels, s.image_size, 0)
    noise[0, 0, 0, 0] = float("nan")
    with pytest.raises(TmpdiffError, match="step 0: the call's hidden_states is not finite .* no engine produced it"):
        runner.sample(sampling_scheduler(s), torch.tensor([0, 1]), noise, SCHEDULE)
    with pytest.raises(TmpdiffError, match="guidance scale must be a finite number"):
        ScheduledRunner(runner.engines, 2, s.channels, s.image_size, float("nan"), s.null_class, s.num_classes)


def _call(pipe, steps: int, seed: int = 0, **extra):
    kwargs = call_kwargs(pipe, steps=steps, seed=seed, guidance_scale=None, text_len=16, sample_size=8)
    return pipe(T2I_PROMPTS, output_type="latent", **kwargs | extra).images


def test_the_trace_is_each_calls_own(t2i_int8_build):
    """The trace starts again at every pipeline call, also for 1-step calls and after a call that failed."""
    _, build, _ = t2i_int8_build
    pipe = load_pipeline(t2i_dir())
    denoiser = attach_engines(pipe, build, precision="int8", threads=1)
    for _ in range(3):
        _call(pipe, 1)
        assert [e.index for e in denoiser.trace.steps] == [0]

    def fail(index, t, latents):
        raise RuntimeError("the caller's callback failed")

    with pytest.raises(RuntimeError):
        _call(pipe, 3, callback=fail, callback_steps=1)
    _call(pipe, 3)
    assert [e.index for e in denoiser.trace.steps] == [0, 1, 2]


def test_a_request_larger_than_memory_is_refused_before_it_is_bound(t2i_int8_build, monkeypatch):
    """The drop-in checks a batch larger than any it holds against the memory available for the rows beyond them
    (the engines' arenas keep their peak), as `run` checks --batch: a service gets an error, not the OOM killer."""
    from tmpdiff.engines import memory

    _, build, _ = t2i_int8_build
    pipe = load_pipeline(t2i_dir())
    denoiser = attach_engines(pipe, build, precision="int8", threads=1)
    held = _call(pipe, 1)  # 2 prompts x 2 (guidance): 4 rows held
    per_row, _ = memory.bytes_per_row(load_manifest(build), "ort", "cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda: 3 * per_row)
    with pytest.raises(TmpdiffError, match=r"8 batch rows need .* more than the 4 rows already held .* smaller request"):
        _call(pipe, 1, num_images_per_prompt=2)
    assert denoiser._batch == 4  # refused before its buffers were made
    assert torch.equal(_call(pipe, 1), held)  # the rows it holds still run
    monkeypatch.setattr(memory, "available_bytes", lambda: 4 * per_row)
    assert _call(pipe, 1, num_images_per_prompt=2).shape[0] == 4 and denoiser.trace.steps[-1].index == 0


def test_a_pipeline_runs_one_call_at_a_time_and_reattaches(t2i_int8_build):
    """A second thread's call on a pipeline in a call is kept apart: the call it interrupted is refused at its next
    step, its own runs as if alone. A closed denoiser refuses calls; attaching again replaces it."""
    _, build, _ = t2i_int8_build
    pipe = load_pipeline(t2i_dir())
    attach_engines(pipe, build, schedule=SCHEDULE, threads=1)
    alone = _call(pipe, 4, seed=1)
    inside, release = threading.Event(), threading.Event()
    outcome: dict = {}

    def wait_once(index, t, latents):
        if index == 0:
            inside.set()
            release.wait(60)

    def first() -> None:
        try:
            _call(pipe, 4, seed=0, callback=wait_once, callback_steps=1)
        except TmpdiffError as exc:
            outcome["error"] = str(exc)

    worker = threading.Thread(target=first)
    worker.start()
    assert inside.wait(60)
    try:
        second = _call(pipe, 4, seed=1)
    finally:
        release.set()
        worker.join(60)
    assert "in a call from another thread" in outcome.get("error", "")
    assert torch.equal(second, alone)

    old = pipe.transformer
    old.close()
    with pytest.raises(TmpdiffError, match="were closed"):
        _call(pipe, 4)
    with pytest.raises(TmpdiffError, match="threads must be in 1"):  # as the CLI's --threads
        attach_engines(pipe, build, schedule=SCHEDULE, threads=0)
    new = attach_engines(pipe, build, schedule=SCHEDULE, threads=1)  # replaces the closed one
    assert pipe.transformer is new and torch.equal(_call(pipe, 4, seed=1), alone)
    # a pipeline made with diffusers' from_pipe shares the attached module; attaching the build to it (as the README
    # says) leaves the first pipeline's engines open: it still calls them
    sibling = type(pipe).from_pipe(pipe)
    assert sibling.transformer is new
    # not attached to it, the engines refuse its calls: they would step on the first pipeline's scheduler (with one
    # of its own, a call ran past that one's timesteps) and its guidance would go unchecked
    with pytest.raises(TmpdiffError, match="from_pipe.*attach the build to this pipeline too"):
        _call(sibling, 4, seed=1)
    from diffusers import DPMSolverMultistepScheduler

    with pytest.raises(TmpdiffError, match="from_pipe.*attach the build to this pipeline too"):
        _call(type(pipe).from_pipe(pipe, scheduler=DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)), 4)
    assert torch.equal(_call(pipe, 4, seed=1), alone)  # the attached pipeline still runs

    class Logged:  # a wrapper keeping the module under the denoiser's name, inside the attached pipeline: no pipeline
        def __init__(self, transformer) -> None:
            self.transformer, self.calls = transformer, 0

        def __getattr__(self, name: str):
            return getattr(self.__dict__["transformer"], name)

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return self.transformer(*args, **kwargs)

    pipe.transformer = Logged(new)
    assert torch.equal(_call(pipe, 4, seed=1), alone) and pipe.transformer.calls == 4
    pipe.transformer = new
    own = attach_engines(sibling, build, schedule=SCHEDULE, threads=1)
    assert sibling.transformer is own and pipe.transformer is new
    assert torch.equal(_call(pipe, 4, seed=1), alone) and torch.equal(_call(sibling, 4, seed=1), alone)
    again = attach_engines(pipe, build, schedule=SCHEDULE, threads=1)  # nobody else calls `new`: it is closed
    assert pipe.transformer is again and torch.equal(_call(pipe, 4, seed=1), alone)
    sibling.transformer = new
    with pytest.raises(TmpdiffError, match="were closed"):
        _call(sibling, 4)
