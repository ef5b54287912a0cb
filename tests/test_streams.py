"""Stream ordering and shared activation memory, the parts that run without CUDA: torch's stream API is replaced by
recorders (the event calls are what `on_stream` is for), and the shared memory keeps its bookkeeping in host memory."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tmpdiff.engines.streams import HostStream, on_stream
from tmpdiff.engines.trt import SharedDeviceMemory
from tmpdiff.formats.errors import TmpdiffError


class _RecordedStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.device = name, log, torch.device("cuda", 0)

    def wait_stream(self, other: _RecordedStream) -> None:
        self.log.append(f"{self.name} waits {other.name}")


class _RuntimeStream:
    def __init__(self, torch_stream: _RecordedStream) -> None:
        self.torch = torch_stream

    def synchronize(self) -> None:
        raise AssertionError("on_stream must order with events, never by waiting on the host")


@pytest.fixture
def recorded(monkeypatch):
    """(log, caller stream, runtime stream): torch.cuda's current stream is the caller's; entering a stream is logged."""
    log: list[str] = []
    caller, runtime = _RecordedStream("caller", log), _RecordedStream("runtime", log)

    @contextlib.contextmanager
    def stream(s):
        log.append(f"enter {s.name}")
        yield
        log.append(f"leave {s.name}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    return log, caller, runtime


def test_block_runs_on_the_runtime_stream_between_two_event_waits(recorded):
    log, _, runtime = recorded
    with on_stream(_RuntimeStream(runtime)):
        log.append("body")
    assert log == ["runtime waits caller", "enter runtime", "body", "leave runtime", "caller waits runtime"]


def test_an_error_in_the_block_still_orders_the_caller_after_it(recorded):
    log, _, runtime = recorded
    with pytest.raises(RuntimeError, match="boom"), on_stream(_RuntimeStream(runtime)):
        log.append("body")
        raise RuntimeError("boom")
    assert log[-1] == "caller waits runtime" and log[0] == "runtime waits caller"


def test_no_waits_when_the_caller_already_is_on_the_runtime_stream_or_on_the_host(recorded):
    log, caller, _ = recorded
    with on_stream(_RuntimeStream(caller)):
        log.append("body")
    with on_stream(HostStream()):
        log.append("host body")
    assert log == ["body", "host body"]


class _Engine:
    """Records where the shared memory points it (what TrtEngine hands to set_device_memory)."""

    def __init__(self) -> None:
        self.pointed: list[tuple[int, int]] = []

    def _use_device_memory(self, memory: SharedDeviceMemory) -> None:
        self.pointed.append((memory.address, memory.size))


def test_zero_byte_engines_get_a_valid_block_and_growth_repoints_every_engine():
    memory = SharedDeviceMemory(torch.device("cpu"), release_when_unused=True)
    small, large, medium = _Engine(), _Engine(), _Engine()
    memory.attach(small, 0)  # the tiny plan may need no activation memory at all
    assert small.pointed == [(memory.address, memory.size)] and memory.address != 0 and memory.size >= 256
    assert memory.address % 256 == 0
    memory.attach(large, 1 << 20)
    assert memory.size == 1 << 20
    assert small.pointed[-1] == large.pointed[-1] == (memory.address, 1 << 20)  # both re-pointed to the new block
    address = memory.address
    memory.attach(medium, 4096)  # fits: nobody moves
    assert memory.address == address and len(small.pointed) == 2 and medium.pointed == [(address, 1 << 20)]
    with pytest.raises(TmpdiffError, match="3 engine"):
        memory.close()
    for engine in (small, large, medium):
        memory.detach(engine)
    assert memory.size == 0  # the last detach released it
    with pytest.raises(TmpdiffError, match="not allocated"):
        _ = memory.address


def test_growth_lets_the_old_block_go_only_when_both_do_not_fit_and_never_leaves_engines_on_freed_memory(monkeypatch):
    """Growing allocates the new block while the old is held; when both do not fit, the old one is let go first;
    when the new one does not fit alone either, the engines get a block of the old size back before the error."""
    memory = SharedDeviceMemory(torch.device("cpu"), release_when_unused=True)
    engine = _Engine()
    memory.attach(engine, 4096)
    empty = torch.empty
    free = {"bytes": 0}  # what the fake device has beyond the blocks held

    def device_empty(size, **kwargs):
        held = memory._buffer.numel() if memory._buffer is not None else 0
        if size > free["bytes"] - held:
            raise torch.OutOfMemoryError("out of memory")
        return empty(size, **kwargs)

    monkeypatch.setattr(torch, "empty", device_empty)
    free["bytes"] = (1 << 20) + 2000  # the new 1 MiB block fits once the old 4 KiB one is gone, not beside it
    memory.reserve(1 << 20)
    assert memory.size == 1 << 20 and engine.pointed[-1] == (memory.address, 1 << 20)
    free["bytes"] = 2 << 20  # 4 MiB fits neither way: the engine is pointed at a new block of the old size
    with pytest.raises(TmpdiffError, match=r"not enough free memory on cpu for 4 MiB .*keep a 1 MiB block"):
        memory.reserve(4 << 20)
    assert memory.size == 1 << 20 and engine.pointed[-1] == (memory.address, 1 << 20)


def test_moving_the_shared_memory_waits_for_a_running_call():
    # A call on GPU engines holds GPU_LOCK (`engine_use.exclusive`); engines loaded by another thread meanwhile grow
    # the shared block: re-pointing it under the call's queued launches would hand them freed memory.
    import threading

    from tmpdiff.engines.streams import GPU_LOCK

    memory = SharedDeviceMemory(torch.device("cpu"), release_when_unused=True)
    running = _Engine()
    memory.attach(running, 1024)
    call_started, call_done = threading.Event(), threading.Event()

    def call() -> None:
        with GPU_LOCK:
            call_started.set()
            call_done.wait(30)

    caller = threading.Thread(target=call)
    caller.start()
    call_started.wait(30)
    loader = threading.Thread(target=lambda: memory.attach(_Engine(), 1 << 20))
    loader.start()
    loader.join(0.5)
    assert loader.is_alive() and memory.size == 1024 and running.pointed == [(memory.address, 1024)]  # waiting
    call_done.set()
    caller.join(30)
    loader.join(30)
    assert not loader.is_alive() and memory.size == 1 << 20 and running.pointed[-1] == (memory.address, 1 << 20)
