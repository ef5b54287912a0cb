"""Rewrites of modelopt's exported ONNX: standard-op twins for ONNX Runtime, weight folding, clean-up.

modelopt's TorchScript export writes fake quantization as graph ops on float weights:
  int8:  W -> QuantizeLinear -> DequantizeLinear -> Transpose -> MatMul        (standard ops)
  fp8:   W -> trt::TRT_FP8QuantizeLinear -> trt::TRT_FP8DequantizeLinear -> ...  (TensorRT-only ops)
  int4:  W(blocks) -> trt::DequantizeLinear(block_size) -> Reshape -> Transpose -> MatMul
Here weights are quantized once, offline, into int8 / float8e4m3fn / int4 initializers feeding a single
DequantizeLinear (transposes folded in), and TensorRT-domain activation Q/DQ become standard ops.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tmpdiff.formats.errors import TmpdiffError

FP8_MAX = 448.0
TRT_DOMAIN = "trt"


@dataclass
class _Graph:
    """Index of a GraphProto: producers, consumers and constant values by tensor name."""

    model: onnx.ModelProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reindex()

    def reindex(self) -> None:
        g = self.model.graph
        self.producer = {out: n for n in g.node for out in n.output}
        self.consumers = defaultdict(list)
        for n in g.node:
            for name in n.input:
                self.consumers[name].append(n)
        self.initializers = {i.name: i for i in g.initializer}

    def const(self, name: str) -> np.ndarray | None:
        """Value of a tensor computed from constants only through Constant / Cast / Reshape, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "Cast":
            value = self.const(node.input[0])
            to = helper.get_attribute_value(node.attribute[0])
            return None if value is None else value.astype(helper.tensor_dtype_to_np_dtype(to))
        return None

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 else None

    def add_initializer(self, tensor: onnx.TensorProto) -> str:
        self.model.graph.initializer.append(tensor)
        self.initializers[tensor.name] = tensor
        return tensor.name

    def replace(self, dead: list[onnx.NodeProto], new: onnx.NodeProto) -> None:
        """Swap a chain of nodes for one node producing the chain's output, and refresh the index."""
        for node in dead:
            self.model.graph.node.remove(node)
        self.model.graph.node.append(new)
        self.reindex()


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


def _make_tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    if array.dtype == ml_dtypes.int4:
        return helper.make_tensor(name, TensorProto.INT4, array.shape, array.astype(np.int8).flatten().tolist())
    if array.dtype == ml_dtypes.float8_e4m3fn:
        return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, array.shape, array.tobytes(), raw=True)
    return numpy_helper.from_array(array, name)


def _zero_point(name: str, kind: str, shape: tuple[int, ...] = ()) -> onnx.TensorProto:
    dtype = {"int8": np.int8, "fp8": ml_dtypes.float8_e4m3fn, "int4": ml_dtypes.int4}[kind]
    return _make_tensor(name, np.zeros(shape, dtype=dtype))


def _fold_transpose(g: _Graph, dq_out: str) -> tuple[onnx.NodeProto | None, bool]:
    """If `dq_out` feeds exactly one 2-D Transpose(perm=[1,0]), return it so it can be folded into the weight."""
    user = g.only_consumer(dq_out)
    if user is not None and user.op_type == "Transpose" and list(g.attr(user, "perm", [])) == [1, 0]:
        return user, True
    return None, False


def _replace_weight_qdq(g: _Graph, kind: str) -> int:
    """Weight Q(W) -> DQ becomes constant Wq -> DQ (int8 / fp8), transposes folded. Returns count."""
    q_ops = {"int8": ("QuantizeLinear", ""), "fp8": ("TRT_FP8QuantizeLinear", TRT_DOMAIN)}[kind]
    folded = 0
    for q in [n for n in g.model.graph.node if (n.op_type, n.domain) == q_ops]:
        weight = g.const(q.input[0])
        if weight is None or weight.ndim < 2:
            continue
        dq = g.only_consumer(q.output[0])
        if dq is None or "DequantizeLinear" not in dq.op_type:
            raise TmpdiffError(f"weight quantizer {q.name} is not followed by one DequantizeLinear")
        scale = g.const(q.input[1])
        axis = g.attr(q, "axis", 1) if scale.size > 1 else None
        qweight = _quantize_weight(weight, _broadcast_scale(scale, weight.shape, axis), kind)
        transpose, fold = _fold_transpose(g, dq.output[0])
        if fold:
            qweight = np.ascontiguousarray(qweight.T)
            axis = None if axis is None else 1 - axis
        base = q.output[0]
        w_name = g.add_initializer(_make_tensor(f"{base}.qweight", qweight))
        s_name = g.add_initializer(numpy_helper.from_array(scale.astype(np.float32).reshape(-1) if axis is not None
                                                           else scale.astype(np.float32).reshape(()), f"{base}.scale"))
        zp = g.add_initializer(_zero_point(f"{base}.zero_point", kind, (scale.size,) if axis is not None else ()))
        attrs = {"axis": axis} if axis is not None else {}
        out = transpose.output[0] if fold else dq.output[0]
        new_dq = helper.make_node("DequantizeLinear", [w_name, s_name, zp], [out], name=f"{base}.dq", **attrs)
        g.replace([q, dq] + ([transpose] if fold else []), new_dq)
        folded += 1
    return folded


def _replace_trt_fp8_activation_qdq(g: _Graph) -> int:
    """trt::TRT_FP8{Quantize,Dequantize}Linear(x, scale) -> standard ops with a float8e4m3fn zero point."""
    swapped = 0
    for node in list(g.model.graph.node):
        if node.domain != TRT_DOMAIN or node.op_type not in ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"):
            continue
        zp = g.add_initializer(_zero_point(f"{node.name}.zero_point", "fp8"))
        op = "QuantizeLinear" if "Quantize" in node.op_type and "Dequantize" not in node.op_type else "DequantizeLinear"
        node.op_type, node.domain = op, ""
        del node.input[2:]
        node.input.append(zp)
        swapped += 1
    g.reindex()
    return swapped


def _replace_int4_weights(g: _Graph, domain: str) -> int:
    """trt::DequantizeLinear on float weight blocks -> int4 initializer (K, N) -> DequantizeLinear(axis 0, block).

    `domain` "" gives the standard opset-21 op (ONNX Runtime); "trt" keeps TensorRT's custom op.
    """
    converted = 0
    for dq in [n for n in g.model.graph.node if n.op_type == "DequantizeLinear" and n.domain == TRT_DOMAIN]:
        blocks, scale = g.const(dq.input[0]), g.const(dq.input[1])
        if blocks is None or scale is None:
            raise TmpdiffError(f"int4 weight dequantizer {dq.name} has non-constant inputs")
        block = int(g.attr(dq, "block_size"))
        reshape = g.only_consumer(dq.output[0])
        if reshape is None or reshape.op_type != "Reshape":
            raise TmpdiffError(f"int4 weight dequantizer {dq.name} is not followed by a Reshape")
        out_features, in_features = (int(v) for v in g.const(reshape.input[1]))
        qweight = _quantize_weight(blocks, scale.reshape(-1, 1), "int4").reshape(out_features, in_features)
        scales = scale.astype(np.float32).reshape(out_features, in_features // block)
        transpose, fold = _fold_transpose(g, reshape.output[0])
        if fold:  # (K, N) layout with blocks along K: what MatMul consumes and MatMulNBits fuses
            qweight, scales, axis, out = np.ascontiguousarray(qweight.T), np.ascontiguousarray(scales.T), 0, transpose.output[0]
        else:
            axis, out = 1, reshape.output[0]
        base = dq.output[0]
        w_name = g.add_initializer(_make_tensor(f"{base}.qweight", qweight))
        s_name = g.add_initializer(numpy_helper.from_array(scales, f"{base}.scale"))
        inputs = [w_name, s_name]
        if domain == "":
            inputs.append(g.add_initializer(_zero_point(f"{base}.zero_point", "int4", scales.shape)))
        new_dq = helper.make_node("DequantizeLinear", inputs, [out], name=f"{base}.int4", domain=domain,
                                  axis=axis, block_size=block)
        g.replace([dq, reshape] + ([transpose] if fold else []), new_dq)
        converted += 1
    return converted


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads and initializers nobody uses; topologically sort the rest."""
    graph = model.graph
    producers = {out: n for n in graph.node for out in n.output}
    used: set[str] = set()
    keep_ids: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in used:
            continue
        used.add(name)
        node = producers.get(name)
        if node is not None and id(node) not in keep_ids:
            keep_ids.add(id(node))
            stack.extend(i for i in node.input if i)
    order: list[onnx.NodeProto] = []
    seen: set[int] = set()

    def visit(node: onnx.NodeProto) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        for name in node.input:
            if name in producers:
                visit(producers[name])
        order.append(node)

    for node in graph.node:
        if id(node) in keep_ids:
            visit(node)
    del graph.node[:]
    graph.node.extend(order)
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _set_opset(model: onnx.ModelProto, opset: int, keep_trt_domain: bool) -> None:
    imports = [o for o in model.opset_import if o.domain not in ("", "ai.onnx", TRT_DOMAIN)]
    imports.append(helper.make_opsetid("", opset))
    if keep_trt_domain and any(n.domain == TRT_DOMAIN for n in model.graph.node):
        imports.append(helper.make_opsetid(TRT_DOMAIN, 1))
    del model.opset_import[:]
    model.opset_import.extend(imports)


def ort_twin(model: onnx.ModelProto, kind: str, opset: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The same quantization in standard ONNX ops ONNX Runtime's CPU provider runs."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    g = _Graph(twin)
    stats: dict[str, int] = {}
    if kind in ("int8", "fp8"):
        stats["weights_folded"] = _replace_weight_qdq(g, kind)
    if kind == "fp8":
        stats["activation_qdq_swapped"] = _replace_trt_fp8_activation_qdq(g)
    if kind == "int4":
        stats["int4_weights"] = _replace_int4_weights(g, domain="")
    remove_dead_nodes(twin)
    del twin.graph.value_info[:]  # exporter-declared types of rewritten ops (uint8 for fp8) no longer hold
    _set_opset(twin, opset, keep_trt_domain=False)
    leftover = sorted({f"{n.domain}::{n.op_type}" for n in twin.graph.node if n.domain == TRT_DOMAIN})
    if leftover:
        raise TmpdiffError(f"ORT twin still holds TensorRT-only ops: {', '.join(leftover)}")
    onnx.checker.check_model(twin)
    return twin, stats


def trt_graph(model: onnx.ModelProto, kind: str, opset: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The graph for TensorRT: modelopt's Q/DQ as exported (trt:: ops included), cleaned.

    int8 keeps standard Q/DQ on float weights (TensorRT folds them at build time) and fp8 keeps
    modelopt's trt::TRT_FP8{Quantize,Dequantize}Linear pairs; int4 gets int4 (K, N) weights into
    trt::DequantizeLinear, the layout modelopt's int4 exporter writes. modelopt's FP8QuantExporter
    post-processing is deliberately not applied: it fp8-quantizes every Conv weight (including the
    patch embedding kept high precision) and adds Q/DQ after Softmax, so the engine would no longer
    compute what the torch fake-quant model and the ORT twin compute.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    stats: dict[str, int] = {}
    if kind == "int4":
        stats["int4_weights"] = _replace_int4_weights(_Graph(out), domain=TRT_DOMAIN)
    remove_dead_nodes(out)
    _set_opset(out, opset, keep_trt_domain=True)
    return out, stats
