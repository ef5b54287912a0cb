"""torch -> ONNX export of a denoiser described by its adapter (TorchScript exporter, in memory)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from tmpdiff.models.adapter import DenoiserAdapter


def export_to_proto(module: torch.nn.Module, adapter: DenoiserAdapter, opset: int, batch: int = 2) -> onnx.ModelProto:
    """Trace `module` (inputs positional in spec order) to an ONNX model with the adapter's names and axes.

    Uses the TorchScript exporter (`dynamo=False`): modelopt's quantizers export through its symbolic
    functions, so fp32 and quantized graphs come from the same tracer.
    """
    inputs = adapter.sample_inputs(adapter.default_dims(batch))
    with tempfile.TemporaryDirectory(prefix="tmpdiff-export-") as tmp_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp_dir) / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                str(path),
                input_names=list(inputs),
                output_names=[s.name for s in adapter.output_specs()],
                dynamic_axes=adapter.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        return onnx.load(str(path))
