"""torch -> ONNX export of a denoiser described by its adapter (TorchScript exporter)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from tmpdiff.formats.atomic import scratch_directory
from tmpdiff.models.adapter import DenoiserAdapter


@contextlib.contextmanager
def traced(module: torch.nn.Module, adapter: DenoiserAdapter, opset: int, batch: int = 2
           ) -> Iterator[tuple[onnx.ModelProto, Path]]:
    """Trace `module` (inputs positional in spec order) to an ONNX model with the adapter's names and axes; yields the
    model and the directory its external data lives in, valid inside the block.

    Uses the TorchScript exporter (`dynamo=False`): modelopt's quantizers export through its symbolic functions, so
    fp32 and quantized graphs come from the same tracer. A model over 2 GB comes back as torch wrote it: tensors as
    references to files in that directory, not loaded (`save_onnx(..., data_dir=)` streams them; `load_weights`
    reads them in).
    """
    inputs = adapter.sample_inputs(adapter.default_dims(batch))
    with scratch_directory("export") as tmp_dir, warnings.catch_warnings():
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
        yield onnx.load(str(path), load_external_data=False), Path(tmp_dir)


def load_weights(model: onnx.ModelProto, data_dir: Path) -> None:
    """Read a traced model's external tensors into memory (graph rewrites need their values)."""
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        onnx.external_data_helper.load_external_data_for_model(model, str(data_dir))
