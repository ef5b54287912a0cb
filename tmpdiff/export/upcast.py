"""A graph traced from a 16-bit model, computed in fp32 outside its quantized weights: the ORT twin of int8/int4.

ONNX Runtime's CPU provider fuses int8 GEMMs only around fp32 Q/DQ, and computes 16-bit graphs in fp32 anyway (it
casts 16-bit weights, and its optimised graph holds them as fp32). A 16-bit model's int8 graph carries its Q/DQ in
16 bits (ModelOpt's "Half" form, `quantize.export_qdq_in_model_dtype`): ONNX Runtime would fuse none of its GEMMs.
int4's exporter writes fp32 Q/DQ and hands the fp32 result on (the cast back to 16 bits is computed and dropped,
modelopt 0.39), so that graph is fp32 downstream of the first quantized layer except where an op takes 16-bit
parameters the exporter did not promote (a UNet's LayerNormalization after a quantized `proj_in`), which ONNX Runtime
refuses. Either way the twin is made fp32 throughout: 16-bit initializers, constants and casts become fp32, 16-bit graph
inputs and outputs are cast at the boundary. Quantized weights (int8, int4) are untouched and their scales become fp32,
so ONNX Runtime fuses the int8 GEMMs as in a twin made from an fp32 model.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
TYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target; RandomNormal(Like), EyeLike and the like


def _float32(tensor: TensorProto) -> TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def _upcast_attributes(node: onnx.NodeProto) -> None:
    for attribute in node.attribute:
        if attribute.name in TYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT and attribute.i in HALF:
            attribute.i = TensorProto.FLOAT
        elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in HALF:
            attribute.t.CopyFrom(_float32(attribute.t))


def upcast_to_float32(model: onnx.ModelProto) -> int:
    """Make `model` (in place) compute in fp32 wherever it held 16-bit floats; its inputs and outputs keep their types
    behind boundary casts. Returns the number of 16-bit initializers converted."""
    graph = model.graph
    if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for attribute in node.attribute):
        raise ValueError("graphs with subgraphs (If / Loop / Scan) are not upcast")
    converted = 0
    for tensor in graph.initializer:
        if tensor.data_type in HALF:
            tensor.CopyFrom(_float32(tensor))
            converted += 1
    for node in graph.node:
        _upcast_attributes(node)
    upcasts, downcasts = [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type in HALF:
            inside = f"{value.name}.float32"
            for node in graph.node:
                node.input[:] = [inside if name == value.name else name for name in node.input]
            upcasts.append(helper.make_node("Cast", [value.name], [inside], name=f"{value.name}.upcast",
                                            to=TensorProto.FLOAT))
    for value in graph.output:
        if value.type.tensor_type.elem_type in HALF:
            inside = f"{value.name}.float32"
            for node in graph.node:
                node.input[:] = [inside if name == value.name else name for name in node.input]
                node.output[:] = [inside if name == value.name else name for name in node.output]
            downcasts.append(helper.make_node("Cast", [inside], [value.name], name=f"{value.name}.downcast",
                                              to=value.type.tensor_type.elem_type))
    nodes = [*upcasts, *graph.node, *downcasts]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # declared 16-bit types of intermediate values no longer hold
    return converted
