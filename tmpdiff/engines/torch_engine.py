"""A torch module as an Engine: the eager (or fake-quant) model run by the same loop as the built engines.

It lets the one sampling loop drive the torch model too: for the fp32 reference in parity tests, for
capturing the denoiser's inputs during real sampling (quantization calibration data), for training-time
evaluation. Inputs are read from the bound buffers positionally, in spec order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from tmpdiff.engines.base import check_buffers
from tmpdiff.engines.streams import Stream
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.specs import TensorSpec
from tmpdiff.models.adapter import model_dtype


class TorchEngine:
    """Runs `module(*inputs in spec order)` on the bound buffers and writes its one output in place."""

    def __init__(self, module: torch.nn.Module, input_specs: list[TensorSpec], output_specs: list[TensorSpec],
                 precision: str = "fp32", device: str = "cpu",
                 on_inputs: Callable[[dict[str, torch.Tensor]], None] | None = None) -> None:
        if len(output_specs) != 1:
            raise TmpdiffError(f"a torch engine writes one output, got {len(output_specs)} specs")
        self.module = module
        self.precision = precision
        self.device = device
        self._input_specs = list(input_specs)
        self._output_specs = list(output_specs)
        self._on_inputs = on_inputs
        self._inputs: Mapping[str, torch.Tensor] | None = None
        self._output: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, adapter, **kwargs) -> TorchEngine:
        """The diffusers model through its adapter's export wrapper (the graphs' inputs and outputs)."""
        # a model loaded in 16 bits computes in 16 bits
        return cls(adapter.export_module(model, model_dtype(model)), adapter.input_specs(), adapter.output_specs(), **kwargs)

    @property
    def input_specs(self) -> list[TensorSpec]:
        return self._input_specs

    @property
    def output_specs(self) -> list[TensorSpec]:
        return self._output_specs

    def bind(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        name = f"{self.precision} torch engine"
        check_buffers(name, self._input_specs, inputs)
        check_buffers(name, self._output_specs, outputs)
        self._inputs, self._output = inputs, outputs[self._output_specs[0].name]

    @torch.no_grad()
    def run(self, stream: Stream) -> None:
        if self._inputs is None or self._output is None:
            raise TmpdiffError(f"{self.precision} torch engine: run() before bind()")
        args = [self._inputs[s.name] for s in self._input_specs]
        if self._on_inputs is not None:
            self._on_inputs({s.name: a.clone() for s, a in zip(self._input_specs, args, strict=True)})
        self._output.copy_(self.module(*args))

    def unbind(self) -> None:
        self._inputs = self._output = None

    def close(self) -> None:
        self.unbind()
