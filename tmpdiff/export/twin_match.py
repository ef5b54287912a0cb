"""A mixed configuration's ORT twin against the uniform exports' twins: each quantized layer the same quantization.

A layer at precision p in a mixed graph is made from the same saved quantizer state as that layer in the uniform p
export, through the same rewrite, so its quantizer nodes (Q/DQ, and int4's AWQ pre-quantization Mul) hold the same
constants (weight codes, scales, zero points, activation scales) and attributes. Its traced scope is the uniform one
with the switch's key added (`.../to_q/int8/weight_quantizer/...` for `.../to_q/weight_quantizer/...`), which pairs
the nodes by name. The parity rule (`exporter.twin_parity_ok`) is relative to the configuration's whole quantization
error, so one damaged layer among many can stay inside it; this check compares every layer on its own, both ways
(no node of the uniform layer missing, none added), and counts the layers of each precision.

On a 16-bit host (`tolerant`) one representation difference is allowed: int8 layers beside int4 ones keep
modelopt's fp32 Q/DQ (`mixed._int8_qdq_dtype`) where the uniform int8 export has fp16 ones, so a float constant may
differ by one fp16 step (subnormals included) and, where it does, a weight code by one step. Zero points never may.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tmpdiff.export.supernet import BASE
from tmpdiff.formats.errors import TmpdiffError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
COMPARED_OPS = (*QDQ_OPS, "Mul")  # Mul: int4's AWQ pre-quantization scale of the layer's input
ZERO_POINT = 2  # input slot of a Q/DQ's zero point
QUANTIZERS = r"(?P<quantizer>weight_quantizer|input_quantizer)"

Node = tuple[str, dict, list]  # op type, attributes, constant input values (None where an input is computed)


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a missing or corrupt file, named for the caller
        raise TmpdiffError(f"cannot read the uniform twin to check the mixed graph's layers against ({exc})",
                           path) from None


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    values = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = attribute.t
    return values


def quantizer_nodes(model: onnx.ModelProto, scoped: re.Pattern) -> tuple[dict[str, Node], list[str]]:
    """The quantizer nodes (`COMPARED_OPS`) whose names `scoped` matches, by name; and the Q/DQ nodes it does not."""
    values = _constants(model)
    nodes, outside = {}, []
    for node in model.graph.node:
        if node.op_type not in COMPARED_OPS:
            continue
        if scoped.match(node.name) is None:
            if node.op_type in QDQ_OPS:
                outside.append(node.name)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = [numpy_helper.to_array(values[i]) if i in values else None for i in node.input]
        nodes[node.name] = (node.op_type, attributes, inputs)
    return nodes, outside


def _fp16_steps(got: np.ndarray, want: np.ndarray) -> int:
    """How many fp16 steps apart the two arrays are at most, once both are rounded to fp16 (large for a sign change)."""
    a = got.astype(np.float16).view(np.int16).astype(np.int32)
    b = want.astype(np.float16).view(np.int16).astype(np.int32)
    return int(np.abs(a - b).max(initial=0))


def _code_steps(got: np.ndarray, want: np.ndarray) -> int:
    if got.dtype.kind in "iub":
        return int(np.abs(got.astype(np.int64) - want.astype(np.int64)).max(initial=0))
    # float8 codes: steps between their bit patterns
    return int(np.abs(got.view(np.uint8).astype(np.int32) - want.view(np.uint8).astype(np.int32)).max(initial=0))


def _node_difference(got: Node, want: Node, tolerant: bool) -> str | None:
    """How a mixed twin's quantizer node differs from the uniform twin's (None: it does not)."""
    (op, attributes, inputs), (want_op, want_attributes, want_inputs) = got, want
    if op != want_op or len(inputs) != len(want_inputs):
        return f"{op} with {len(inputs)} inputs, the uniform twin's {want_op} with {len(want_inputs)}"
    if attributes != want_attributes:
        return f"attributes {attributes}, the uniform twin's {want_attributes}"
    rescaled, codes = False, []
    for slot, (a, b) in enumerate(zip(inputs, want_inputs, strict=True)):
        if a is None or b is None:
            if (a is None) != (b is None):
                return f"input {slot} is a constant on one side only"
            continue
        if a.shape != b.shape:
            return f"input {slot} of shape {list(a.shape)}, the uniform twin's {list(b.shape)}"
        if a.dtype.kind == "f" and a.dtype.itemsize > 1 and b.dtype.kind == "f" and b.dtype.itemsize > 1:  # scales
            if np.array_equal(a.astype(np.float64), b.astype(np.float64)):
                continue
            steps = _fp16_steps(a, b)
            if not tolerant or steps > 1:
                relative = float(np.max(np.abs(a.astype(np.float64) - b) / np.maximum(np.abs(b), 1e-30)))
                return f"input {slot} values up to {relative:.2g} apart (relative)"
            rescaled = True
        elif slot == ZERO_POINT and op in QDQ_OPS:
            if not np.array_equal(a, b):
                return f"input {slot} (zero point) differs"
        else:
            codes.append((slot, a, b))
    for slot, a, b in codes:
        steps = 0 if np.array_equal(a, b) else _code_steps(a, b) if a.dtype == b.dtype else None
        if steps is None or steps > (1 if rescaled else 0):
            return f"input {slot} codes differ ({'dtype' if steps is None else f'up to {steps} steps'})"
    return None


def uniform_twins_of(build_dir: Path, manifest, precisions: Iterable[str]) -> dict[str, Path]:
    """Precision -> the build's uniform ORT twin, for the quantized precisions among `precisions`."""
    return {p: build_dir / manifest.precisions[p].onnx for p in sorted(set(precisions) - {BASE})}


def check_layers_match_uniform(twin: onnx.ModelProto, uniform_twins: Mapping[str, Path], layers: Mapping[str, int],
                               path: Path, *, tolerant: bool = False) -> int:
    """Refuse (TmpdiffError naming `path`) a mixed twin unless, for every precision p of `uniform_twins` (precision ->
    the build's uniform twin file), it holds quantizer scopes of exactly `layers[p]` layers, and each such layer's
    quantizer nodes are the uniform p twin's nodes for that layer, none missing or added, with the same attributes
    and constants (`tolerant`: a 16-bit host's allowance, see the module docstring). A Q/DQ node outside every
    precision's quantizer scope is refused too. Returns the count of nodes compared."""
    if not uniform_twins:
        return 0
    missing = sorted(set(layers) - set(uniform_twins))
    if missing:
        raise TmpdiffError(f"no uniform twin given for {', '.join(missing)} to check its layers against", path)
    precisions = "|".join(map(re.escape, uniform_twins))
    scoped = re.compile(rf"^(?P<scope>.*)/(?P<precision>{precisions})/{QUANTIZERS}/(?P<rest>.*)$")
    uniform_scoped = re.compile(rf"^(?P<scope>.*)/{QUANTIZERS}/(?P<rest>.*)$")
    nodes, outside = quantizer_nodes(twin, scoped)
    if outside:
        raise TmpdiffError(f"{len(outside)} Q/DQ nodes are in no quantized layer's scope ({outside[0]!r}, ...), so "
                           "their layers cannot be checked against the uniform twins", path)
    compared = 0
    for precision, twin_path in uniform_twins.items():
        mine = {}  # uniform name -> this twin's node
        scopes = set()
        for name, node in nodes.items():
            match = scoped.match(name)
            if match["precision"] == precision:
                mine[f"{match['scope']}/{match['quantizer']}/{match['rest']}"] = (name, node)
                scopes.add(match["scope"])
        if len(scopes) != layers.get(precision, 0):
            raise TmpdiffError(f"{len(scopes)} {precision} layers have quantizer nodes, the configuration has "
                               f"{layers.get(precision, 0)}", path)
        uniform, _ = quantizer_nodes(_load(twin_path), uniform_scoped)  # one uniform twin held at a time
        expected = {name for name in uniform if uniform_scoped.match(name)["scope"] in scopes}
        missing = sorted(expected - set(mine))
        if missing:
            raise TmpdiffError(f"{missing[0]} of the uniform {precision} twin ({twin_path}) has no counterpart in "
                               f"this layer of the mixed graph ({len(missing)} nodes missing)", path)
        for uniform_name, (name, node) in mine.items():
            if uniform_name not in uniform:
                raise TmpdiffError(f"{name}: no such node in the uniform {precision} twin ({twin_path}), so this "
                                   "layer cannot be checked", path)
            problem = _node_difference(node, uniform[uniform_name], tolerant)
            if problem is not None:
                raise TmpdiffError(f"{name} differs from the uniform {precision} twin's ({problem}): this layer's "
                                   "quantization is not the one its export made and checked", path)
            compared += 1
        del uniform
    return compared
