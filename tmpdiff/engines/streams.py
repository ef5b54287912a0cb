"""Where engine launches are ordered: the host (CPU, synchronous) or one CUDA stream."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from tmpdiff.engines.trt_build import cuda_device

# GPU engines of a process launch on one CUDA stream (`runtime_stream`) and TensorRT's share one activation memory
# (`trt.default_device_memory`): two calls at once would interleave on both, or one CUDA graph capture the other's
# work, and re-pointing the shared memory while another thread launches would hand it freed memory. Calls hold it
# (`runtime.engine_use.exclusive`), and so does every change to a shared activation memory. Re-entrant: a call
# inside a call on other GPU engines in the same thread is ordered on the stream, not concurrent.
GPU_LOCK = threading.RLock()


@runtime_checkable
class Stream(Protocol):
    """Where engine launches are ordered. On CPU every call completes before it returns."""

    def synchronize(self) -> None: ...


class HostStream:
    """The CPU 'stream': launches are synchronous, so there is nothing to wait for."""

    handle = 0
    torch = None

    def synchronize(self) -> None:
        return None


@functools.cache
def runtime_stream(device: str) -> Stream:
    """Where the runtime launches: the host for CPU; otherwise one dedicated, non-default CUDA stream per process
    (the legacy default stream makes TensorRT synchronise and cannot capture CUDA graphs). Engines get it at load
    (ORT-CUDA as its compute stream) and the sampling loop runs its torch work on it (`on_stream`)."""
    if device == "cpu":
        return HostStream()
    return CudaStream()


@contextlib.contextmanager
def on_stream(stream: Stream) -> Iterator[None]:
    """Run the block's torch work on `stream`, after whatever the caller's current stream has queued and before
    whatever it queues next: ordered with events (`wait_stream`), never by waiting on the host."""
    torch_stream = getattr(stream, "torch", None)
    if torch_stream is None:
        yield
        return
    caller = torch.cuda.current_stream(torch_stream.device)
    if caller == torch_stream:
        yield
        return
    torch_stream.wait_stream(caller)
    try:
        with torch.cuda.stream(torch_stream):
            yield
    finally:  # also after an error: whatever the caller queues next (clean-up included) follows the block's work
        caller.wait_stream(torch_stream)


class CudaStream:
    """A CUDA stream for TensorRT launches (wraps torch.cuda.Stream); `handle` is the cudaStream_t as an int."""

    def __init__(self, device: int | str | None = None, stream: torch.cuda.Stream | None = None) -> None:
        gpu = cuda_device(device)
        self.torch = stream if stream is not None else torch.cuda.Stream(device=gpu.index)
        self.device_index = gpu.index

    @property
    def handle(self) -> int:
        return int(self.torch.cuda_stream)

    def synchronize(self) -> None:
        self.torch.synchronize()
