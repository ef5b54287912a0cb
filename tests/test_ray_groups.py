"""Ray actor groups' lifetime: a failed start names its cause and leaves nothing running, groups share the local Ray
this process started (the last to close shuts it down), and a cluster too small for the actors is refused at once."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.runtime import ray_executor
from tmpdiff.runtime.ray_executor import ActorGroup
from tmpdiff.runtime.workers import WorkerSpec


@dataclass(frozen=True)
class EchoSpec:
    threads: int | None = 1
    device: str = "cpu"
    fail: str | None = None  # the constructor raises this
    sleep: float = 0.0  # the constructor takes this long


class Echo:
    """A trivial actor in place of one holding engines."""

    def __init__(self, spec: EchoSpec) -> None:
        if spec.fail:
            raise TmpdiffError(spec.fail)
        time.sleep(spec.sleep)

    def ready(self) -> int:
        return os.getpid()

    def echo(self, value):
        return value


@pytest.fixture
def ray(monkeypatch):
    """Ray, down before and after the test whatever it did."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    monkeypatch.setattr(ray_executor, "_ray_holders", 0, raising=False)
    yield ray
    if ray.is_initialized():
        ray.shutdown()


def _init_small(ray, cpus: int) -> None:
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=ray_executor.OBJECT_STORE_BYTES)


def _group(spec: EchoSpec = EchoSpec(), workers: int = 1) -> ActorGroup:
    return ActorGroup(Echo, spec, workers, None, "worker", "no sample was produced")


def test_an_actor_that_fails_to_start_names_its_cause_and_stops_ray(ray):
    with pytest.raises(TmpdiffError) as caught:
        _group(EchoSpec(fail="/b/fp32: model.ort-cpu.onnx is missing"), workers=2)
    assert str(caught.value) == "a Ray worker failed to start: /b/fp32: model.ort-cpu.onnx is missing"
    assert not ray.is_initialized()  # the local Ray it started is shut down again


def test_actors_that_do_not_start_in_time_fail_the_group_and_stop_ray(ray, monkeypatch):
    """ray.get on the actors' ready calls had no timeout: an actor Ray could not place, or whose engines never
    loaded, left the command waiting forever."""
    monkeypatch.setattr(ray_executor, "START_TIMEOUT_SECONDS", 1.0)
    started = time.monotonic()
    with pytest.raises(TmpdiffError, match=r"^1 of 1 Ray workers did not start within 1 s: Ray could not place them"):
        _group(EchoSpec(sleep=60.0))
    assert time.monotonic() - started < 30
    assert not ray.is_initialized()


def test_closing_one_group_keeps_ray_for_the_others(ray):
    first, second = _group(), _group()
    assert first.started_here and second.started_here
    first.close()
    first.close()  # twice: nothing more to give back
    assert ray.is_initialized() and second.get([second.actors[0].echo.remote(5)]) == [5]
    ray.kill(second.actors[0])  # already gone when the group stops it
    second.close()
    assert not ray.is_initialized()  # the last group shut it down

    _init_small(ray, 2)  # someone else's Ray: used, never shut down
    third = _group()
    assert not third.started_here
    third.close()
    assert ray.is_initialized()


def test_a_cluster_too_small_for_the_actors_is_refused_before_any_starts(ray):
    _init_small(ray, 1)
    with pytest.raises(TmpdiffError, match=r"^2 Ray workers of 1 CPU each need 2 CPUs; the Ray cluster has 1 free of "
                                           r"1: lower --parallel or --threads$"):
        _group(EchoSpec(threads=1), workers=2)

    from tmpdiff.calibration.fanout import RaySamplePool, SamplingSpec

    worker = WorkerSpec(Path("unused"), "ort", "cpu", ("fp32",), 1, 1, 3, 8, 1.0, 0, 10)
    with pytest.raises(TmpdiffError, match=r"2 Ray evaluation workers .* lower --workers or --threads$"):
        RaySamplePool(SamplingSpec(worker, None, torch.zeros(1), torch.zeros(1)), 2)
    assert ray.is_initialized()  # someone else's Ray


def test_a_second_group_beyond_the_local_ray_is_refused(ray):
    """The local Ray is sized for the first group; a second that does not fit beside it is refused, not left waiting."""
    cores = os.cpu_count() or 1
    first = _group(EchoSpec(threads=cores))
    try:
        with pytest.raises(TmpdiffError, match=f"need {cores} CPUs; the Ray cluster has 0 free of {cores}"):
            _group(EchoSpec(threads=cores))
        assert first.get([first.actors[0].echo.remote(1)]) == [1]
    finally:
        first.close()
    assert not ray.is_initialized()
