"""How much memory a graph needs per batch row: its I/O and its largest intermediate tensor (ONNX shape inference).

Recorded in the manifest at export, read by `run` to refuse a batch that cannot fit before allocating it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, shape_inference


def _row_bytes(value: onnx.ValueInfoProto, batch_axis: str) -> int | None:
    """Bytes per batch row of a tensor whose first axis is the named batch axis (None for any other tensor)."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape") or not tensor.shape.dim or tensor.shape.dim[0].dim_param != batch_axis:
        return None
    size = 1
    for dim in tensor.shape.dim[1:]:
        if not dim.HasField("dim_value"):
            return None  # another symbolic axis: not known per row
        size *= dim.dim_value
    return size * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize


def activation_bytes_per_row(path: Path, batch_axis: str = "batch") -> int:
    """The largest intermediate tensor per batch row, after shape inference (0 when no shape is known).

    Reads the graph without its weights, so a model with gigabytes of external data costs no memory here.
    """
    model = onnx.load(str(path), load_external_data=False)
    inferred = shape_inference.infer_shapes(model, strict_mode=False)
    sizes = [_row_bytes(v, batch_axis) for v in inferred.graph.value_info]
    return max((s for s in sizes if s is not None), default=0)
