"""One layer configuration of the super-network as engine graphs: the ONNX Runtime twin and the TensorRT graph.

The super-network at a configuration is traced as any quantized model is (modelopt's Q/DQ symbolics); then, as for a
uniform export, each quantization kind present gets its rewrite (`graph_rewrite`, which takes the set of kinds):
- the ORT twin: int8 / fp8 weights folded to int8 / float8e4m3fn initializers, fp8 activation Q/DQ made standard,
  int4 weights to int4 DequantizeLinear; parity-checked against the super-network on random inputs by the uniform
  twins' rule (`exporter.twin_parity_ok`: relative to the configuration's quantization error, its distance from the
  super-network's fp32 configuration), and, layer by layer, its Q/DQ constants against the build's uniform twins
  (`twin_match`);
- the TensorRT graph: the same weights into DequantizeLinear (int4 into trt::DequantizeLinear), on a 16-bit base
  (`export.half`); its graph census must show every non-fp32 layer quantized, and where ONNX Runtime can run it
  (fp16 base, no trt:: ops) it is parity-checked like a uniform precision's TensorRT graph.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from tmpdiff.engines.ort import LEVELS, session_options
from tmpdiff.export import census as graph_census
from tmpdiff.export.exporter import (
    FLOAT32_TWIN_KINDS,
    _relative_error,
    check_half_parity,
    parity_ok,
    twin_parity_ok,
)
from tmpdiff.export.graph_rewrite import ort_twin, trt_graph
from tmpdiff.export.half import to_half
from tmpdiff.export.half_convolutions import fp32_compute, fp32_convolutions
from tmpdiff.export.onnx_export import load_weights, traced
from tmpdiff.export.onnx_io import is_large, tensor_bytes
from tmpdiff.export.quantize import export_qdq_in_model_dtype
from tmpdiff.export.supernet import BASE, SuperNet
from tmpdiff.export.twin_match import check_layers_match_uniform
from tmpdiff.formats.atomic import TEMP_SUFFIX, check_confined, temp_prefix
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.precisions import get_precision
from tmpdiff.models.adapter import DenoiserAdapter, model_dtype

TRACE_OPSET = 19  # as the uniform exports trace
PARITY_SEEDS = 3


@dataclass(frozen=True)
class MixedGraphs:
    """What `export_mixed` wrote (relative to its directory's parent build: the caller records it)."""

    parity_error: float  # ORT twin vs the super-network
    error_vs_fp32: float  # ORT twin vs the super-network's fp32 configuration
    torch_error_vs_fp32: float  # the super-network vs its fp32 configuration: the quantization error
    trt_parity_error: float | None  # TensorRT graph on ONNX Runtime vs the super-network (None: ORT cannot run it)
    census: dict[str, int]


def optimization_level(config: Sequence[str]) -> str:
    """ORT's level for the graph: the lowest any of its precisions needs (fp8 graphs load only at `basic`)."""
    return min((get_precision(p).ort_optimization for p in set(config)), key=LEVELS.index)


def _kinds(config: Sequence[str]) -> set[str]:
    return {get_precision(p).rewrite_kind for p in config} - {None}


def _opset(config: Sequence[str], which: str) -> int:
    return max(getattr(get_precision(p), which) for p in set(config))


def _session(path: Path, level: str):
    """A CPU session on the options the engines run the graph with (`engines.ort.session_options`, as the uniform
    exports' checks): with ORT's own, its MatMulNBits kernel quantized int4 layers' activations to int8 (W4A8, the
    default accuracy level), 4e-3 from the super-network on the tiny DiT where the graph itself is 3e-7 from it."""
    import onnxruntime as ort

    options = session_options(optimization=level, priority_order=True)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return _relative_error(got, want)


def export_mixed(supernet: SuperNet, config: Sequence[str], adapter: DenoiserAdapter, directory: Path,
                 trt_dtype: str = "float16", uniform_twins: Mapping[str, Path] | None = None) -> MixedGraphs:
    """Write `model.onnx` (ORT twin) and `model.trt.onnx` (TensorRT graph) of `config` into `directory`; refused
    (TmpdiffError) when either graph does not compute what the super-network does (`twin_ok`, `check_half_parity`),
    or, given `uniform_twins` (precision -> the build's uniform ORT twin of each quantized precision in `config`),
    when a layer's quantization differs from that twin's (`twin_match`).
    Both are made and checked in a staging directory beside it and moved in only then: a refused or killed export
    leaves the earlier graphs."""
    import shutil
    import tempfile

    check_confined(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(directory.name), suffix=TEMP_SUFFIX, dir=directory.parent))
    try:
        graphs = _export_checked(supernet, config, adapter, staging, trt_dtype, uniform_twins or {})
        for name in ("model.onnx", "model.trt.onnx"):
            os.replace(staging / name, directory / name)
    except TmpdiffError as exc:  # named by the file it was to become: the staging directory is removed below
        if exc.path is None or not exc.path.is_relative_to(staging):
            raise
        message = str(exc).removeprefix(f"{exc.path}: ")
        raise TmpdiffError(f"{message} (not written)", directory / exc.path.relative_to(staging)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return graphs


def _export_checked(supernet: SuperNet, config: Sequence[str], adapter: DenoiserAdapter, directory: Path,
                    trt_dtype: str, uniform_twins: Mapping[str, Path]) -> MixedGraphs:
    kinds = _kinds(config)
    dtype = model_dtype(supernet.model)  # float32, or the 16 bits the build's model was loaded in (as its exports)
    half_reference = dtype != torch.float32  # so is the reference every error is measured against
    if half_reference:
        _int8_qdq_dtype(supernet, "Float" if "int4" in kinds else "Half")
    saved = supernet.config
    supernet.select(config)
    try:
        module = adapter.export_module(supernet.model, dtype)  # graph inputs and outputs stay float32
        with fp32_convolutions(), traced(module, adapter, TRACE_OPSET) as (raw, data_dir):
            load_weights(raw, data_dir)
        inputs = [adapter.sample_inputs(adapter.default_dims(2), seed=seed) for seed in range(PARITY_SEEDS)]
        with torch.no_grad(), fp32_compute():  # a 16-bit host's CPU convolutions and GEMMs (`half_convolutions`)
            want = [module(*x.values()).numpy() for x in inputs]
            supernet.select(supernet.uniform("fp32"))
            fp32 = [module(*x.values()).numpy() for x in inputs]
    finally:
        supernet.select(saved)
    feeds = [{k: v.numpy() for k, v in x.items()} for x in inputs]

    # as a uniform export from a 16-bit model: an int8 / int4 twin computes in fp32 outside its quantized weights
    upcast = half_reference and bool(kinds & set(FLOAT32_TWIN_KINDS))
    twin, _ = ort_twin(raw, kinds, _opset(config, "ort_opset"), float32=upcast)
    twin_path = directory / "model.onnx"
    if is_large(twin):  # a deployment records its two graph files and their hashes, no external data beside them
        raise TmpdiffError(f"the graphs of this layer configuration hold {tensor_bytes(twin) / 1e9:.2f} GB of weights, "
                           "past what a graph is written with inline (TMPDIFF_EXTERNAL_DATA_BYTES); deploying layer "
                           "configurations of models this large is not supported yet: run the plan's uniform "
                           "configurations, or deploy on a smaller model", twin_path)
    layers = {precision: config.count(precision) for precision in set(config) - {BASE}}
    check_layers_match_uniform(twin, uniform_twins, layers, twin_path, tolerant=half_reference)
    onnx.save(twin, str(twin_path))
    del twin
    session = _session(twin_path, optimization_level(config))
    got = [session.run(None, f)[0] for f in feeds]
    parity = float(np.median([_relative(g, w) for g, w in zip(got, want, strict=True)]))
    error = float(np.median([_relative(g, f) for g, f in zip(got, fp32, strict=True)]))
    torch_error = float(np.median([_relative(w, f) for w, f in zip(want, fp32, strict=True)]))
    del got
    if not twin_ok(config, parity, error, torch_error, half_reference=half_reference):
        raise TmpdiffError(f"the mixed graph differs from the super-network by {parity:.2e} (see exporter.twin_parity_ok: "
                           f"a share of the quantization error, and the same error vs the fp32 configuration: ORT "
                           f"{error:.2e}, super-network {torch_error:.2e})", twin_path)

    trt_proto, _ = trt_graph(raw, kinds, _opset(config, "trt_opset"))
    del raw
    trt_path = directory / "model.trt.onnx"
    trt_proto = to_half(trt_proto, str(trt_path), trt_dtype)
    rows = graph_census.census(trt_proto)
    problems = graph_census.missing_quantization(rows, *_expected_quantized(supernet, config))
    if problems:
        raise TmpdiffError(f"graph census found unquantized layers: {'; '.join(problems[:5])}", trt_path)
    onnx.save(trt_proto, str(trt_path))
    trt_parity = None
    if trt_dtype == "float16" and not any(n.domain == "trt" for n in trt_proto.graph.node):
        trt_parity = _trt_parity(trt_path, feeds, want, fp32)
    return MixedGraphs(parity_error=parity, error_vs_fp32=error, torch_error_vs_fp32=torch_error,
                       trt_parity_error=trt_parity, census=graph_census.summarize(rows))


def twin_ok(config: Sequence[str], parity: float, error: float, torch_error: float, *,
            half_reference: bool = False) -> bool:
    """The uniform twins' rule for `config`'s ORT twin: `parity` from the super-network at `config`, `error` and
    `torch_error` (the twin's and the super-network's) from its fp32 configuration; with no quantized layer, fp32's."""
    kinds = _kinds(config)
    if not kinds:
        return parity_ok(BASE, parity, error, torch_error)
    return twin_parity_ok(kinds, parity, error, torch_error, half_reference=half_reference)


def _expected_quantized(supernet: SuperNet, config: Sequence[str]) -> tuple[set[str], set[str]]:
    """Graph module paths (the traced layer inside its switch) whose weights, and whose inputs, must be quantized."""
    weights, inputs = set(), set()
    for name, precision in zip(supernet.layers, config, strict=True):
        if precision == "fp32":
            continue
        layer = supernet.switches[name].alternatives[precision]
        path = f"{name}.{precision}"  # TorchScript scopes the switch's ModuleDict entry by its key alone
        for quantizer, names in (("weight_quantizer", weights), ("input_quantizer", inputs)):
            q = getattr(layer, quantizer, None)
            if q is not None and q.is_enabled:
                names.add(path)
    return weights, inputs


def _int8_qdq_dtype(supernet: SuperNet, dtype: str) -> None:
    """The Q/DQ dtype of the int8 layers' quantizers in a 16-bit host: "Half", as the uniform int8 export of a 16-bit
    model makes them (`quantize.export_qdq_in_model_dtype`), unless int4 layers are present: their fp32 Q/DQ hand
    fp32 on, and modelopt exports a Half Q/DQ only for 16-bit inputs ("Float" takes either). Set at every export:
    the super-network serves several configurations."""
    for name in supernet.layers:
        alternatives = supernet.switches[name].alternatives
        if "int8" in alternatives:
            export_qdq_in_model_dtype(alternatives["int8"], dtype)


def _trt_parity(path: Path, feeds: list[dict], want: list[np.ndarray], fp32: list[np.ndarray]) -> float:
    """The fp16 TensorRT graph on ONNX Runtime vs the super-network, by the uniform exports' rule."""
    session = _session(path, "basic")
    got = [session.run(None, f)[0].astype(np.float32) for f in feeds]
    error = float(np.median([_relative(g, w) for g, w in zip(got, want, strict=True)]))
    vs_fp32 = float(np.median([_relative(g, f) for g, f in zip(got, fp32, strict=True)]))
    quantization = float(np.median([_relative(w, f) for w, f in zip(want, fp32, strict=True)]))
    check_half_parity(error, vs_fp32, quantization, "the mixed TensorRT graph", "the super-network", path)
    return error
