"""torch -> ONNX export of a denoiser described by its adapter, written atomically and checked."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from tmpdiff.atomic import atomic_path
from tmpdiff.errors import TmpdiffError
from tmpdiff.models.adapter import DenoiserAdapter

# onnx protobufs cannot exceed 2 GB; larger graphs must keep weights in external data.
PROTOBUF_LIMIT = 2**31 - 1


def export_onnx(
    model: torch.nn.Module,
    adapter: DenoiserAdapter,
    path: str | Path,
    opset: int = 19,
    batch: int = 2,
) -> Path:
    """Export `model` to `path` with the adapter's names and dynamic axes; the file appears only if valid.

    Uses the TorchScript exporter (`dynamo=False`): it is the one modelopt's quantized modules export
    through, so fp32 and quantized graphs come from the same tracer.
    """
    path = Path(path)
    module = adapter.export_module(model)
    inputs = adapter.sample_inputs(adapter.default_dims(batch))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                str(tmp),
                input_names=list(inputs),
                output_names=[s.name for s in adapter.output_specs()],
                dynamic_axes=adapter.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        if tmp.stat().st_size > PROTOBUF_LIMIT:
            raise TmpdiffError("exported graph exceeds 2 GB without external data", path)
        onnx.checker.check_model(str(tmp))
    return path
