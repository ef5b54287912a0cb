"""Where engine launches are ordered: the host (CPU, synchronous) or one CUDA stream."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from tmpdiff.engines.trt_build import cuda_device


@runtime_checkable
class Stream(Protocol):
    """Where engine launches are ordered. On CPU every call completes before it returns."""

    def synchronize(self) -> None: ...


class HostStream:
    """The CPU 'stream': launches are synchronous, so there is nothing to wait for."""

    handle = 0

    def synchronize(self) -> None:
        return None


def runtime_stream(device: str) -> Stream:
    """Where a runtime launches: the host for CPU; otherwise torch's current CUDA stream, so engine launches
    and the torch scheduler maths between them are ordered on one stream without host synchronisation."""
    if device == "cpu":
        return HostStream()
    return CudaStream(stream=torch.cuda.current_stream())


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
