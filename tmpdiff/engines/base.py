"""The Engine protocol every backend implements, and the checks they share.

The runtime owns the buffers (torch tensors on the engine's device); an engine is bound to them once
and then run on a stream. Switching engines between steps therefore moves no data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from tmpdiff.engines.streams import Stream
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.specs import TensorSpec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
                "bfloat16": torch.bfloat16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


@runtime_checkable
class Engine(Protocol):
    """One runnable precision of a denoiser on one backend."""

    precision: str
    device: str

    @property
    def input_specs(self) -> list[TensorSpec]: ...

    @property
    def output_specs(self) -> list[TensorSpec]: ...

    def bind(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        """Bind to runtime-owned buffers (called once per buffer set, not per step)."""

    def run(self, stream: Stream) -> None:
        """Launch one inference reading the bound inputs and writing the bound outputs."""

    def unbind(self) -> None:
        """Forget the bound buffers; the engine stays loaded and runs again after the next `bind`."""

    def close(self) -> None:
        """Unbind and free what the engine holds (a TensorRT plan's context and engine); it cannot run again."""


def check_buffers(engine_name: str, specs: list[TensorSpec], buffers: Mapping[str, torch.Tensor]) -> None:
    """Every spec has a buffer of matching rank, fixed sizes and dtype; contiguous memory. Named problem otherwise."""
    missing = [s.name for s in specs if s.name not in buffers]
    if missing:
        raise TmpdiffError(f"{engine_name}: no buffer for {', '.join(missing)}")
    for spec in specs:
        buf = buffers[spec.name]
        if buf.dim() != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, buf.shape, strict=False)):
            raise TmpdiffError(f"{engine_name}: {spec.name} buffer has shape {tuple(buf.shape)}, engine expects {spec.shape}")
        if TORCH_DTYPES.get(spec.dtype) != buf.dtype:
            raise TmpdiffError(f"{engine_name}: {spec.name} buffer is {buf.dtype}, engine expects {spec.dtype}")
        if not buf.is_contiguous():
            raise TmpdiffError(f"{engine_name}: {spec.name} buffer is not contiguous")
