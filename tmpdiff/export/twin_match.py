"""A mixed configuration's ORT twin against the uniform exports' twins: each quantized layer the same quantization.

A layer at precision p in a mixed graph is made from the same saved quantizer state as that layer in the uniform p
export, through the same rewrite, so its Q/DQ nodes hold the same constants (weight codes, scales, zero points,
activation scales). Its traced scope is the uniform one with the switch's key added
(`.../to_q/int8/weight_quantizer/...` for `.../to_q/weight_quantizer/...`), which pairs the nodes by name. The parity
rule (`exporter.twin_parity_ok`) is relative to the configuration's whole quantization error, so one damaged layer
among many can stay inside it; this check compares every layer on its own.

One representation difference is allowed: in a twin made from a 16-bit model, int8 layers beside int4 ones keep
modelopt's fp32 Q/DQ (`mixed._int8_qdq_dtype`) where the uniform int8 export has fp16 ones, so a scale may differ by
fp16 rounding and a weight code by one step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tmpdiff.formats.errors import TmpdiffError

SCALE_RTOL = 2.0**-10  # fp16's relative rounding step: a scale rounded to fp16 in one graph and not the other
CODE_STEP = 1  # a weight code may then round the other way

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    values = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = attribute.t
    return values


def qdq_constants(model: onnx.ModelProto) -> dict[str, tuple[str, list[np.ndarray | None]]]:
    """Per Q/DQ node name: its op and the values of its constant inputs (None where an input is computed)."""
    values = _constants(model)
    return {node.name: (node.op_type, [numpy_helper.to_array(values[i]) if i in values else None for i in node.input])
            for node in model.graph.node if node.op_type in QDQ_OPS}


def _difference(got: np.ndarray | None, want: np.ndarray | None) -> str | None:
    """How one constant input differs beyond the allowed representation difference (None: it does not)."""
    if got is None or want is None:
        return None if got is None and want is None else "a constant on one side only"
    if got.shape != want.shape:
        return f"shape {list(got.shape)} against {list(want.shape)}"
    if got.dtype.kind in "iub" and want.dtype.kind in "iub":
        step = int(np.abs(got.astype(np.int64) - want.astype(np.int64)).max(initial=0))
        return None if step <= CODE_STEP else f"codes up to {step} steps apart"
    a, b = got.astype(np.float64), want.astype(np.float64)
    relative = float((np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float64).tiny)).max(initial=0.0))
    return None if relative <= SCALE_RTOL else f"values up to {relative:.2g} apart (relative)"


def check_layers_match_uniform(twin: onnx.ModelProto, uniform_twins: Mapping[str, Path], path: Path) -> int:
    """Refuse (TmpdiffError naming `path`) a twin whose Q/DQ constants of a layer at precision p differ from the
    uniform p twin's (`uniform_twins`: precision -> that twin's file), or have no counterpart there; the count of
    nodes compared. Every precision given must have at least one node, so a change of scope names cannot make the
    check pass by comparing nothing."""
    if not uniform_twins:
        return 0
    scoped = re.compile(rf"^(?P<scope>.*)/(?P<precision>{'|'.join(map(re.escape, uniform_twins))})/"
                        r"(?P<quantizer>weight_quantizer|input_quantizer)/(?P<rest>.*)$")
    by_precision: dict[str, list[tuple[str, str, tuple[str, list]]]] = {p: [] for p in uniform_twins}
    for name, node in qdq_constants(twin).items():
        match = scoped.match(name)
        if match is not None:
            uniform_name = f"{match['scope']}/{match['quantizer']}/{match['rest']}"
            by_precision[match["precision"]].append((name, uniform_name, node))
    compared = 0
    for precision, nodes in by_precision.items():
        if not nodes:
            raise TmpdiffError(f"no {precision} layer's Q/DQ found by its scope name, so the layers cannot be checked "
                               f"against the uniform {precision} twin", path)
        uniform = qdq_constants(onnx.load(str(uniform_twins[precision])))  # one uniform twin held at a time
        for name, uniform_name, (op, inputs) in nodes:
            if uniform_name not in uniform:
                raise TmpdiffError(f"{name}: no such node in the uniform {precision} twin "
                                   f"({uniform_twins[precision]}), so this layer cannot be checked", path)
            uniform_op, uniform_inputs = uniform[uniform_name]
            if op != uniform_op or len(inputs) != len(uniform_inputs):
                raise TmpdiffError(f"{name}: {op} with {len(inputs)} inputs, the uniform {precision} twin's "
                                   f"{uniform_op} with {len(uniform_inputs)}", path)
            for slot, (got, want) in enumerate(zip(inputs, uniform_inputs, strict=True)):
                problem = _difference(got, want)
                if problem is not None:
                    raise TmpdiffError(f"{name} input {slot} differs from the uniform {precision} twin's ({problem}): "
                                       "this layer's quantization is not the one its export made and checked", path)
            compared += 1
        del uniform
    return compared
