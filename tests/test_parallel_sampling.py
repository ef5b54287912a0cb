"""DRiffusion draft-and-refine sampling: N = 1 is sequential, executors agree bit for bit, rounds follow the rates."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli_helpers import cli
from tmpdiff.commands.run import RunRequest, run
from tmpdiff.engines.loading import load_engines
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.models.schedulers import sampling_scheduler, scheduler_from
from tmpdiff.runtime.parallel import (
    ParallelMode,
    check_parallel_scheduler,
    expected_rounds,
    sample_parallel,
)
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise
from tmpdiff.runtime.workers import DenoiseWorker, InProcessExecutor, WorkerSpec

MIXED = ["fp32", "int8", "int8", "fp32", "int8", "fp32", "fp32", "int8", "fp32", "fp32"]
LABELS = torch.tensor([3, 8])


def _spec(build_dir, batch=2, threads=1) -> WorkerSpec:
    s = load_manifest(build_dir).sampling
    return WorkerSpec(build_dir, "ort", "cpu", ("fp32", "int8"), threads, batch, s.channels, s.image_size,
                      s.guidance_scale, s.null_class, s.num_classes)


@pytest.fixture(scope="module")
def setup(quant_build):
    """One runner (fp32 + int8 engines, one thread) shared by the sequential and the emulated parallel sampler."""
    _, build_dir, _ = quant_build
    manifest = load_manifest(build_dir)
    s = manifest.sampling
    engines = load_engines(build_dir, manifest, "ort", "cpu", ["fp32", "int8"], threads=1)
    runner = ScheduledRunner(engines, 2, s.channels, s.image_size, s.guidance_scale, s.null_class, s.num_classes)
    yield build_dir, manifest.sampling, runner
    runner.close()


class Counting(InProcessExecutor):
    """The in-process executor, recording each round's calls (step index, precision)."""

    def __init__(self, worker, workers):
        super().__init__(worker, workers)
        self.rounds: list[list[tuple[int, str]]] = []

    def evaluate(self, calls):
        self.rounds.append([(c.index, c.precision) for c in calls])
        return super().evaluate(calls)


def _parallel(setup, workers, mode, precisions=MIXED, seed=4, executor=None):
    _, sampling, runner = setup
    executor = executor or Counting(DenoiseWorker(runner), workers)
    noise = initial_noise(2, sampling.channels, sampling.image_size, seed)
    return sample_parallel(executor, sampling_scheduler(sampling), LABELS, noise, precisions, mode), executor


@pytest.mark.parametrize("mode", list(ParallelMode))
def test_one_worker_is_the_sequential_runner_bit_for_bit(setup, mode):
    _, sampling, runner = setup
    sequential = runner.sample(sampling_scheduler(sampling), LABELS, initial_noise(2, sampling.channels,
                                                                                    sampling.image_size, 4), MIXED)
    result, executor = _parallel(setup, 1, mode)
    assert torch.equal(result.latents, sequential.latents)
    assert result.rounds == len(MIXED) and [e.precision for e in result.trace.steps] == MIXED


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("mode", list(ParallelMode))
def test_rounds_follow_the_stated_rate(setup, workers, mode):
    """conservative: n+1 steps per 2 rounds (rate 2/(n+1)); aggressive: x_0 alone, then n steps a round (1/n).
    Every step is evaluated exactly once, on the engine the schedule names for it, at most n calls a round."""
    steps = 3 * (workers + 1) if mode is ParallelMode.conservative else 1 + 3 * workers
    precisions = (MIXED * 2)[:steps]
    result, executor = _parallel(setup, workers, mode, precisions)
    rate = 2 / (workers + 1) if mode is ParallelMode.conservative else 1 / workers
    tail = 0 if mode is ParallelMode.conservative else 1
    assert result.rounds == len(executor.rounds) == expected_rounds(steps, workers, mode)
    assert result.rounds == round(rate * (steps - tail)) + tail
    calls = [c for r in executor.rounds for c in r]
    assert calls == list(enumerate(precisions)) and result.calls == steps
    assert max(len(r) for r in executor.rounds) == workers
    if mode is ParallelMode.conservative:  # anchor alone, then n drafts
        assert [len(r) for r in executor.rounds] == [1, workers] * 3
    else:
        assert [len(r) for r in executor.rounds] == [1] + [workers] * 3
    assert torch.isfinite(result.latents).all()


def test_two_workers_stay_close_to_the_sequential_sample(setup):
    """Measured (fp32, 20 steps, classes 3 and 8, seed 4): max |diff| to the sequential sample 0.0285 (conservative)
    and 0.0199 (aggressive) at N = 2, in images of range [-1, 1]; bound 0.05. N = 8: 0.49 and 1.26."""
    _, sampling, runner = setup
    fp32 = ["fp32"] * 20
    sequential = runner.sample(sampling_scheduler(sampling), LABELS, initial_noise(2, sampling.channels,
                                                                                    sampling.image_size, 4), fp32).latents
    for mode in ParallelMode:
        two = (_parallel(setup, 2, mode, fp32)[0].latents - sequential).abs().max().item()
        eight = (_parallel(setup, 8, mode, fp32)[0].latents - sequential).abs().max().item()
        assert 0 < two < 0.05, (mode, two)
        assert two < eight, (mode, two, eight)


def test_run_request_parallel_matches_the_emulation(setup):
    """`run(..., parallel=2)` (what the CLI calls) gives the sample of the executor built here by hand."""
    build_dir, _, _ = setup
    result, _, info = run(RunRequest(build_dir=build_dir, classes=[3, 8], seed=4, schedule_path=None, precision="fp32",
                                     steps=10, threads=1, parallel=2, mode="aggressive"))
    by_hand, _ = _parallel(setup, 2, ParallelMode.aggressive, ["fp32"] * 10)
    assert torch.equal(result.latents, by_hand.latents) and info["rounds"] == expected_rounds(10, 2, "aggressive") == 6


def test_local_executor_equals_ray_bit_for_bit(setup):
    """N = 2 Ray actors (one thread each, a local cluster started and shut down here) against the in-process
    emulation, both modes, a mixed schedule; then an actor killed mid-run fails the run in one line."""
    ray = pytest.importorskip("ray")
    from tmpdiff.runtime.ray_executor import RayExecutor

    build_dir, _, _ = setup
    executor = RayExecutor(_spec(build_dir), 2)
    try:
        assert executor.started_here and len(set(executor.pids)) == 2
        for mode in ParallelMode:
            on_ray, _ = _parallel(setup, 2, mode, executor=executor)
            emulated, _ = _parallel(setup, 2, mode)
            assert torch.equal(on_ray.latents, emulated.latents), mode
            assert on_ray.rounds == emulated.rounds
        ray.kill(executor.actors[1])
        with pytest.raises(TmpdiffError, match="Ray worker died"):
            _parallel(setup, 2, ParallelMode.aggressive, executor=executor)
    finally:
        executor.close()
    assert not ray.is_initialized()


@pytest.mark.parametrize("name, config, why", [
    ("EulerDiscreteScheduler", {}, "cannot be drafted"),
    ("FlowMatchEulerDiscreteScheduler", {}, "cannot be drafted"),
    ("DDPMScheduler", {}, "cannot be drafted"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "deterministic"),
    ("DDIMScheduler", {"prediction_type": "flow"}, "prediction_type"),
])
def test_schedulers_the_skip_transition_cannot_express_are_refused(name, config, why):
    with pytest.raises(TmpdiffError, match=why):
        check_parallel_scheduler(scheduler_from(name, config))
    for ok in ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"):
        check_parallel_scheduler(scheduler_from(ok, {}))


@pytest.mark.parametrize("options, message", [
    ({"parallel": 0}, "--parallel must be at least 1"),
    ({"parallel": 2, "mode": "greedy"}, "--mode must be"),
    ({"parallel": 2, "executor": "dask"}, "--executor must be"),
    ({"parallel": 2, "address": "10.0.0.1:6379"}, "needs --executor ray"),
    ({"executor": "ray"}, "needs --parallel 2"),
    ({"parallel": 4, "executor": "ray", "steps": 4}, "more Ray workers than the 3 calls a round of 4 steps can have"),
])
def test_bad_parallel_options_are_refused(setup, options, message):
    build_dir, _, _ = setup
    with pytest.raises(TmpdiffError, match=message):
        run(RunRequest(build_dir=build_dir, classes=[1], precision="fp32", **options))


def test_cli_parallel(setup, tmp_path):
    build_dir, _, _ = setup
    code, out, err = cli("run", build_dir, "--precision", "fp32", "--steps", "10", "--class", "1,2", "--parallel", "4",
                         "--mode", "aggressive", "--threads", "1", "--out", tmp_path / "p.png", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["rounds"] == 4 and report["mode"] == "aggressive" and len(report["steps"]) == 10
    assert cli("run", build_dir, "--precision", "fp32", "--parallel", "2", "--mode", "greedy")[0] == 2
    assert cli("run", build_dir, "--precision", "fp32", "--parallel", "0")[0] == 2
    code, _, err = cli("run", build_dir, "--precision", "fp32", "--class", "1", "--address", "127.0.0.1:1",
                       "--parallel", "2", "--out", tmp_path / "q.png")
    assert code == 2 and "--address names a Ray cluster: it needs --executor ray" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "q.png").exists()
