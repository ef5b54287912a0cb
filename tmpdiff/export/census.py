"""Graph census: which MatMul / Gemm / Conv nodes of an exported graph take quantized inputs."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

GEMM_OPS = ("MatMul", "Gemm", "Conv")
# ops whose compute dtype decides a 16-bit engine's speed: GEMMs, attention's softmax, normalisations
COMPUTE_OPS = (*GEMM_OPS, "Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization")
PASS_THROUGH = ("Transpose", "Reshape", "Cast")


@dataclass(frozen=True)
class CensusRow:
    node: str
    op: str
    module: str  # torch module path the node was traced from
    input_quantized: bool
    weight_quantized: bool


WRAPPER_SCOPES = ("embedding_input", "model")  # the export wrappers' attributes, outermost first


def _module_of(node_name: str) -> str:
    # TorchScript export names nodes "/model/<dotted.module.path>/<Op>"; the adapter's wrapper adds "model" (and a
    # --time-embedding-input export "embedding_input" around it).
    parts = [p for p in node_name.split("/") if p][:-1]
    for scope in WRAPPER_SCOPES:
        if parts and parts[0] == scope:
            parts = parts[1:]
    return ".".join(parts)


def census(model: onnx.ModelProto) -> list[CensusRow]:
    """One row per MatMul/Gemm/Conv: does each operand come from a DequantizeLinear (through layout ops)?"""
    producer = {out: n for n in model.graph.node for out in n.output}

    def from_dequantize(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in PASS_THROUGH:
            node = producer.get(node.input[0])
        return node is not None and "DequantizeLinear" in node.op_type

    rows = []
    for node in model.graph.node:
        if node.op_type in GEMM_OPS:
            rows.append(CensusRow(node.name, node.op_type, _module_of(node.name),
                                  from_dequantize(node.input[0]), len(node.input) > 1 and from_dequantize(node.input[1])))
    return rows


def missing_quantization(rows: list[CensusRow], weight_modules: set[str], input_modules: set[str]) -> list[str]:
    """Modules meant to be quantized (by their enabled quantizers) whose graph node lacks quantized operands."""
    problems = []
    seen = {r.module: r for r in rows}
    for module in sorted(weight_modules | input_modules):
        row = seen.get(module)
        if row is None:
            problems.append(f"{module}: no MatMul/Gemm/Conv found in the graph")
            continue
        if module in weight_modules and not row.weight_quantized:
            problems.append(f"{module}: weight is not quantized in the graph")
        if module in input_modules and not row.input_quantized:
            problems.append(f"{module}: input activation is not quantized in the graph")
    return problems


def summarize(rows: list[CensusRow]) -> dict[str, int]:
    """Counts for the manifest and the CLI table."""
    return {
        "gemm_nodes": len(rows),
        "weight_quantized": sum(r.weight_quantized for r in rows),
        "input_quantized": sum(r.input_quantized for r in rows),
        "both_quantized": sum(r.weight_quantized and r.input_quantized for r in rows),
    }


def compute_dtypes(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Per op type in COMPUTE_OPS, how many nodes compute in each dtype (their first input's, by ONNX shape inference).

    In a strongly typed TensorRT network this is the precision the layer runs in: a quantized graph whose GEMMs read
    float32 dequantized values runs them in FP32/TF32 (what `tmpdiff export` records, per TensorRT graph)."""
    import numpy as np
    from onnx import helper, shape_inference

    from tmpdiff.export.onnx_io import weightless

    inferred = shape_inference.infer_shapes(weightless(model), strict_mode=False)  # any model size
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types |= {t.name: t.data_type for t in inferred.graph.initializer}
    for node in inferred.graph.node:  # Constant outputs carry their tensor's type
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            types[node.output[0]] = node.attribute[0].t.data_type
    counts: dict[str, dict[str, int]] = {}
    for node in inferred.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        elem = types.get(node.input[0])
        name = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name if elem else "unknown"
        per_op = counts.setdefault(node.op_type, {})
        per_op[name] = per_op.get(name, 0) + 1
    return counts
