"""One layer configuration of the super-network as an ONNX Runtime graph (the ORT twin of a mixed-precision model).

The super-network at a configuration is traced as any quantized model is (modelopt's Q/DQ symbolics), then each
quantization kind present gets the same graph rewrite as its uniform export: int8 and fp8 weights folded to
int8 / float8e4m3fn initializers, fp8 activation Q/DQ made standard, int4 weights to int4 DequantizeLinear. The graph
is parity-checked against the super-network on random inputs. Not yet: a manifest entry, a TensorRT graph, `tmpdiff
run` and `tmpdiff check` for such graphs (issue 16, item 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from tmpdiff.export import graph_rewrite as rewrite
from tmpdiff.export.onnx_export import load_weights, traced
from tmpdiff.export.supernet import SuperNet
from tmpdiff.formats.atomic import atomic_path
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.precisions import get_precision
from tmpdiff.models.adapter import DenoiserAdapter

TRACE_OPSET = 19  # as the uniform exports trace


def mixed_twin(model: onnx.ModelProto, kinds: set[str]) -> onnx.ModelProto:
    """The standard-op graph of a model whose layers carry several quantization kinds."""
    graph = rewrite._import(model)
    if "int8" in kinds:
        rewrite._replace_weight_qdq(graph, "int8")
    if "fp8" in kinds:
        rewrite._replace_weight_qdq(graph, "fp8")
        rewrite._replace_trt_fp8_activation_qdq(graph)
    if "int4" in kinds:
        rewrite._replace_int4_weights(graph, domain="")
    twin = rewrite._export(graph, model)
    del twin.graph.value_info[:]
    rewrite._set_opset(twin, 21 if "int4" in kinds else 19, keep_trt_domain=False)
    leftover = sorted({f"{n.domain}::{n.op_type}" for n in twin.graph.node if n.domain == rewrite.TRT_DOMAIN})
    if leftover:
        raise TmpdiffError(f"the mixed graph still holds TensorRT-only ops: {', '.join(leftover)}")
    onnx.checker.check_model(twin)
    return twin


def optimization_level(config: Sequence[str]) -> str:
    """ORT's level for the graph: the lowest any of its precisions needs (fp8 graphs load only at `basic`)."""
    levels = ("disable", "basic", "extended", "all")
    return min((get_precision(p).ort_optimization for p in set(config)), key=levels.index)


def export_mixed(supernet: SuperNet, config: Sequence[str], adapter: DenoiserAdapter, path: Path,
                 tolerance: float = 2e-2) -> float:
    """Write the ORT graph of `config` to `path` (atomically); returns its parity error vs the super-network."""
    import onnxruntime as ort

    kinds = {get_precision(p).rewrite_kind for p in config} - {None}
    saved = supernet.config
    supernet.select(config)
    try:
        module = adapter.export_module(supernet.model)
        with traced(module, adapter, TRACE_OPSET) as (raw, data_dir):
            load_weights(raw, data_dir)
        twin = mixed_twin(raw, kinds)
        with atomic_path(path) as tmp:
            onnx.save(twin, str(tmp))
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, {
            "disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
            "all": "ORT_ENABLE_ALL"}[optimization_level(config)])
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        errors = []
        for seed in range(3):
            inputs = adapter.sample_inputs(adapter.default_dims(2), seed=seed)
            with torch.no_grad():
                want = module(*inputs.values()).numpy()
            got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
            errors.append(float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)))
    finally:
        supernet.select(saved)
    parity = float(np.median(errors))
    if not parity <= tolerance:
        raise TmpdiffError(f"the mixed graph differs from the super-network by {parity:.2e} (> {tolerance})", path)
    return parity
