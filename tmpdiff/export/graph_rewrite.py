"""Rewrites of modelopt's exported ONNX: standard-op twins for ONNX Runtime, weight folding, clean-up.

modelopt's TorchScript export writes fake quantization as graph ops on float weights:
  int8:  W -> QuantizeLinear -> DequantizeLinear -> Transpose -> MatMul        (standard ops)
  fp8:   W -> trt::TRT_FP8QuantizeLinear -> trt::TRT_FP8DequantizeLinear -> ...  (TensorRT-only ops)
  int4:  W(blocks) -> trt::DequantizeLinear(block_size) -> Reshape -> Transpose -> MatMul
Here weights are quantized once, offline, into int8 / float8e4m3fn / int4 initializers feeding a single
DequantizeLinear (transposes folded in), and TensorRT-domain activation Q/DQ become standard ops.

The rewrites work on an onnx-graphsurgeon graph: a replaced chain is detached from its tensors at once
(so producer / consumer links stay exact for the next match) and dropped by one cleanup at the end.
"""

from __future__ import annotations

from collections.abc import Collection

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from tmpdiff.export.onnx_io import is_large, weightless
from tmpdiff.export.upcast import upcast_to_float32
from tmpdiff.formats.errors import TmpdiffError

FP8_MAX = 448.0
TRT_DOMAIN = "trt"


def _is(node: gs.Node, op: str, domain: str = "") -> bool:
    return node.op == op and (node.domain or "") == domain


def _live(graph: gs.Graph, op: str, domain: str = "") -> list[gs.Node]:
    """The `domain::op` nodes still wired into the graph (replaced chains stay in graph.nodes, detached, until cleanup)."""
    return [n for n in graph.nodes if n.outputs and _is(n, op, domain)]


def _const(tensor: gs.Tensor) -> np.ndarray | None:
    """Value of a tensor computed from constants only through Constant / Cast / Reshape, else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if _is(node, "Constant"):
        value = node.attrs.get("value")
        return value.values if isinstance(value, gs.Constant) else None
    if _is(node, "Cast"):
        value = _const(node.inputs[0])
        return None if value is None else value.astype(helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    if _is(node, "Reshape"):
        value, shape = _const(node.inputs[0]), _const(node.inputs[1])
        if value is None or shape is None:
            return None
        # ONNX Reshape: 0 copies the input's dimension unless allowzero=1; -1 is inferred (as numpy does)
        dims = [value.shape[i] if d == 0 and not node.attrs.get("allowzero", 0) else int(d) for i, d in enumerate(shape)]
        return value.reshape(dims)
    return None


def _only_consumer(tensor: gs.Tensor) -> gs.Node | None:
    users = tensor.outputs
    return users[0] if len(users) == 1 else None


def _replace(graph: gs.Graph, chain: list[gs.Node], new: gs.Node) -> None:
    """Swap a chain of nodes for `new`, which takes over the output tensor of the chain's last node.

    The chain is only detached (its tensors forget it); the final cleanup drops it with whatever
    constants fed only it.
    """
    out = chain[-1].outputs[0]
    for node in chain:
        node.inputs.clear()
        node.outputs.clear()
    new.outputs.append(out)
    graph.nodes.append(new)


def _broadcast_scale(scale: np.ndarray, weight_shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    if scale.size == 1:
        return scale.reshape(())
    shape = [1] * len(weight_shape)
    shape[axis if axis is not None else 1] = scale.size
    return scale.reshape(shape)


def _quantize_weight(weight: np.ndarray, scale: np.ndarray, kind: str) -> np.ndarray:
    scaled = weight / scale
    if kind == "int8":
        return np.clip(np.rint(scaled), -128, 127).astype(np.int8)
    if kind == "fp8":
        return np.clip(scaled, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    if kind == "int4":
        return np.clip(np.rint(scaled), -8, 7).astype(ml_dtypes.int4)
    raise ValueError(kind)


def _constant(name: str, array: np.ndarray) -> gs.Constant:
    if array.dtype == ml_dtypes.int4:
        # graphsurgeon 0.6.1 writes a numpy Constant's bytes as raw data, one byte per element, which ONNX
        # rejects for int4 (two per byte): hand it the packed TensorProto, exported as is.
        return gs.Constant(name, LazyValues(numpy_helper.from_array(array, name)))
    return gs.Constant(name, array)


def _scale_dtype(scale: np.ndarray) -> np.dtype:
    """The dtype a weight's DequantizeLinear scale keeps: its own 16-bit type in a graph traced from a 16-bit model
    (the scale's type is the type DequantizeLinear outputs), else float32."""
    return scale.dtype if scale.dtype in (np.float16, ml_dtypes.bfloat16) else np.dtype(np.float32)


def _zero_point(name: str, kind: str, shape: tuple[int, ...] = ()) -> gs.Constant:
    dtype = {"int8": np.int8, "fp8": ml_dtypes.float8_e4m3fn, "int4": ml_dtypes.int4}[kind]
    return _constant(name, np.zeros(shape, dtype=dtype))


def _foldable_transpose(tensor: gs.Tensor) -> gs.Node | None:
    """The one 2-D Transpose(perm=[1,0]) reading `tensor`, if that is its only consumer: it can be folded into the weight."""
    user = _only_consumer(tensor)
    if user is not None and _is(user, "Transpose") and list(user.attrs.get("perm", [])) == [1, 0]:
        return user
    return None


def _replace_weight_qdq(graph: gs.Graph, kind: str) -> int:
    """Weight Q(W) -> DQ becomes constant Wq -> DQ (int8 / fp8), transposes folded. Returns count."""
    q_op, q_domain = {"int8": ("QuantizeLinear", ""), "fp8": ("TRT_FP8QuantizeLinear", TRT_DOMAIN)}[kind]
    folded = 0
    for q in _live(graph, q_op, q_domain):
        weight = _const(q.inputs[0])
        if weight is None or weight.ndim < 2:
            continue  # an activation quantizer (or a 1-D one), left as it is
        dq = _only_consumer(q.outputs[0])
        if dq is None or "DequantizeLinear" not in dq.op:
            raise TmpdiffError(f"weight quantizer {q.name} is not followed by one DequantizeLinear")
        scale = _const(q.inputs[1])
        if scale is None:
            raise TmpdiffError(f"weight quantizer {q.name} has a non-constant scale")
        # QuantizeLinear's default axis is 1; modelopt's per-channel weight scales give it explicitly
        axis = q.attrs.get("axis", 1) if scale.size > 1 else None
        qweight = _quantize_weight(weight, _broadcast_scale(scale, weight.shape, axis), kind)
        transpose = _foldable_transpose(dq.outputs[0])
        if transpose is not None:
            # DQ(Wq, axis=a) -> Transpose(perm=[1,0]) == DQ(Wq^T, axis=1-a): a per-channel scale indexes
            # the channel dimension, which the 2-D transpose moves from axis a to axis 1-a.
            qweight = np.ascontiguousarray(qweight.T)
            axis = None if axis is None else 1 - axis
        base = q.outputs[0].name
        scale = scale.astype(_scale_dtype(scale)).reshape(-1 if axis is not None else ())
        inputs = [_constant(f"{base}.qweight", qweight), _constant(f"{base}.scale", scale),
                  _zero_point(f"{base}.zero_point", kind, (scale.size,) if axis is not None else ())]
        new_dq = gs.Node("DequantizeLinear", name=f"{base}.dq", attrs={"axis": axis} if axis is not None else {},
                         inputs=inputs)
        _replace(graph, [q, dq] + ([transpose] if transpose is not None else []), new_dq)
        folded += 1
    return folded


def _replace_trt_fp8_activation_qdq(graph: gs.Graph) -> int:
    """trt::TRT_FP8{Quantize,Dequantize}Linear(x, scale) -> standard ops with a float8e4m3fn zero point.

    Both compute x / scale (resp. x * scale). On the standard QuantizeLinear the zero point's type selects
    the output type: float8e4m3fn (saturating at +-448, like modelopt's fake quantization) rather than the
    default uint8; its DequantizeLinear gets the matching one.
    """
    standard = {"TRT_FP8QuantizeLinear": "QuantizeLinear", "TRT_FP8DequantizeLinear": "DequantizeLinear"}
    swapped = 0
    for node in [n for n in graph.nodes if n.outputs and n.domain == TRT_DOMAIN and n.op in standard]:
        node.op, node.domain = standard[node.op], None
        while len(node.inputs) > 2:
            node.inputs.pop()
        node.inputs.append(_zero_point(f"{node.outputs[0].name}.zero_point", "fp8"))
        swapped += 1
    return swapped


def _replace_int4_weights(graph: gs.Graph, domain: str) -> int:
    """trt::DequantizeLinear on float weight blocks -> int4 initializer (K, N) -> DequantizeLinear(axis 0, block).

    `domain` "" gives the standard opset-21 op (ONNX Runtime); "trt" keeps TensorRT's custom op.

    modelopt hands its block quantizer the (N, K) = (out_features, in_features) weight viewed as
    (N*K/B, B) rows of B consecutive in_features, with one scale (amax / 7) per row, shape (N*K/B, 1);
    its trt::DequantizeLinear(axis=0, block_size=B) on those float rows is followed by a Reshape back
    to (N, K) and (for MatMul) a Transpose to (K, N). Quantizing the rows and reshaping them to (N, K) puts block b of
    output n at columns [b*B, (b+1)*B), so the scales reshape to (N, K/B) and opset 21's blocked
    DequantizeLinear(axis=1, block_size=B) - y[n, k] = x[n, k] * scale[n, k // B] - replaces all three
    nodes up to the Reshape. Folding the Transpose transposes both: int4 (K, N), scales (K/B, N), blocks
    along axis 0, the layout MatMul consumes and ORT's MatMulNBits fusion expects.
    """
    converted = 0
    for dq in _live(graph, "DequantizeLinear", TRT_DOMAIN):
        blocks, scale = _const(dq.inputs[0]), _const(dq.inputs[1])
        if blocks is None or scale is None:
            raise TmpdiffError(f"int4 weight dequantizer {dq.name} has non-constant inputs")
        block = int(dq.attrs["block_size"])
        reshape = _only_consumer(dq.outputs[0])
        if reshape is None or not _is(reshape, "Reshape"):
            raise TmpdiffError(f"int4 weight dequantizer {dq.name} is not followed by a Reshape")
        shape = _const(reshape.inputs[1])
        if shape is None or shape.size != 2:
            raise TmpdiffError(f"int4 weight dequantizer {dq.name} is not reshaped to a constant 2-D weight shape")
        out_features, in_features = (int(v) for v in shape)
        qweight = _quantize_weight(blocks, scale.reshape(-1, 1), "int4").reshape(out_features, in_features)
        scales = scale.astype(_scale_dtype(scale)).reshape(out_features, in_features // block)
        transpose = _foldable_transpose(reshape.outputs[0])
        if transpose is not None:
            qweight, scales, axis = np.ascontiguousarray(qweight.T), np.ascontiguousarray(scales.T), 0
        else:
            axis = 1
        base = dq.outputs[0].name
        inputs = [_constant(f"{base}.qweight", qweight), _constant(f"{base}.scale", scales)]
        if domain == "":  # TensorRT's op takes no zero point; opset 21's needs an int4 one to dequantize int4
            inputs.append(_zero_point(f"{base}.zero_point", "int4", scales.shape))
        new_dq = gs.Node("DequantizeLinear", name=f"{base}.int4", attrs={"axis": axis, "block_size": block},
                         inputs=inputs, domain=domain or None)
        _replace(graph, [dq, reshape] + ([transpose] if transpose is not None else []), new_dq)
        converted += 1
    return converted


def _export(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """`graph` without unused nodes and initializers, topologically sorted, with `like`'s model-level fields."""
    graph.cleanup().toposort()
    # explicit opset imports: graphsurgeon would otherwise append missing domains to `like`'s own list
    model = gs.export_onnx(graph, opset_imports=list(like.opset_import))
    model.doc_string, model.domain, model.model_version = like.doc_string, like.domain, like.model_version
    model.metadata_props.extend(like.metadata_props)
    return model


def _import(model: onnx.ModelProto) -> gs.Graph:
    """`model` as a graphsurgeon graph whose export leaves `model` as it was.

    graphsurgeon exports an imported tensor by writing its name into the TensorProto it came from.
    Initializers always carry theirs; a node attribute's tensor (Constant, ConstantOfShape) often has
    none and would gain an empty one, so those small tensors are loaded into detached copies.
    """
    graph = gs.import_onnx(model)
    for sub in (graph, *graph.functions, *graph.subgraphs(recursive=True)):
        for node in sub.nodes:
            for key, value in node.attrs.items():
                if isinstance(value, gs.Constant):
                    node.attrs[key] = gs.Constant(value.name, value.values)
    return graph


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads and initializers nobody uses; topologically sort the rest.

    Works in place on a weightless copy's answer, so a multi-gigabyte graph's weights are never copied."""
    cleaned = _export(gs.import_onnx(weightless(model)), model).graph
    used = {tensor.name for tensor in cleaned.initializer}
    for index in reversed(range(len(model.graph.initializer))):
        if model.graph.initializer[index].name not in used:
            del model.graph.initializer[index]
    del model.graph.node[:]
    model.graph.node.extend(cleaned.node)


def _set_opset(model: onnx.ModelProto, opset: int, keep_trt_domain: bool) -> None:
    imports = [o for o in model.opset_import if o.domain not in ("", "ai.onnx", TRT_DOMAIN)]
    imports.append(helper.make_opsetid("", opset))
    if keep_trt_domain and any(n.domain == TRT_DOMAIN for n in model.graph.node):
        imports.append(helper.make_opsetid(TRT_DOMAIN, 1))
    del model.opset_import[:]
    model.opset_import.extend(imports)


def _kinds(kind: str | Collection[str]) -> set[str]:
    return {kind} if isinstance(kind, str) else set(kind)


def _rewrite_weights(graph: gs.Graph, kinds: set[str], int4_domain: str) -> dict[str, int]:
    """Each present quantization kind's rewrite (a mixed-precision graph carries several, one per layer)."""
    stats: dict[str, int] = {}
    for kind in ("int8", "fp8"):
        if kind in kinds:
            stats["weights_folded"] = stats.get("weights_folded", 0) + _replace_weight_qdq(graph, kind)
    if "fp8" in kinds:
        stats["activation_qdq_swapped"] = _replace_trt_fp8_activation_qdq(graph)
    if "int4" in kinds:
        stats["int4_weights"] = _replace_int4_weights(graph, domain=int4_domain)
    return stats


def ort_twin(model: onnx.ModelProto, kind: str | Collection[str], opset: int,
             float32: bool = False) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The same quantization in standard ONNX ops ONNX Runtime's CPU provider runs (`kind`: one quantization kind,
    or the kinds a mixed-precision graph's layers carry); with `float32`, a graph traced from a 16-bit model computes
    in fp32 outside its quantized weights (`export.upcast`)."""
    graph = _import(model)
    stats = _rewrite_weights(graph, _kinds(kind), int4_domain="")
    twin = _export(graph, model)
    del twin.graph.value_info[:]  # exporter-declared types of rewritten ops (uint8 for fp8) no longer hold
    if float32:
        stats["upcast_initializers"] = upcast_to_float32(twin)
    _set_opset(twin, opset, keep_trt_domain=False)
    leftover = sorted({f"{n.domain}::{n.op_type}" for n in twin.graph.node if n.domain == TRT_DOMAIN})
    if leftover:
        raise TmpdiffError(f"ORT twin still holds TensorRT-only ops: {', '.join(leftover)}")
    if not is_large(twin):  # a large graph cannot be checked in memory; ONNX Runtime loads the saved file at parity
        onnx.checker.check_model(twin)
    return twin, stats


def trt_graph(model: onnx.ModelProto, kind: str | Collection[str], opset: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The graph for TensorRT, before its 16-bit conversion (`export.half`); `kind` as for `ort_twin`.

    int8 and fp8 get the ORT twin's weights: int8 / float8e4m3fn initializers into a DequantizeLinear, the
    weight-only-DQ form ModelOpt's own ONNX flow writes for TensorRT (its `qdq_to_dq`), which TensorRT builds exactly
    as the Q/DQ pair on float weights but which holds a quarter of the bytes (an SD1.5 UNet's int8 graph on float
    weights ran out of 21 GB inside AutoCast); fp8's activation Q/DQ become standard float8 ops (modelopt's
    trt::TRT_FP8 ops would also parse, but AutoCast cannot type them without TensorRT installed). int4 gets int4 (K, N) weights into
    trt::DequantizeLinear, the layout modelopt's int4 exporter writes. modelopt's FP8QuantExporter
    post-processing is deliberately not applied: it fp8-quantizes every Conv weight (including the
    patch embedding kept high precision) and adds Q/DQ after Softmax, so the engine would no longer
    compute what the torch fake-quant model and the ORT twin compute.
    """
    kinds = _kinds(kind)
    graph = _import(model)
    stats = _rewrite_weights(graph, kinds, int4_domain=TRT_DOMAIN)
    out = _export(graph, model)
    if "fp8" in kinds:
        del out.graph.value_info[:]  # exporter-declared types of the swapped ops (uint8) no longer hold
    _set_opset(out, opset, keep_trt_domain=True)
    return out, stats
