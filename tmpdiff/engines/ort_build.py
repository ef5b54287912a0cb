"""Preparing ORT engines: optimise each precision's graph once and save it beside the ONNX.

ORT's fully optimised graph can hold hardware-specific kernels (NCHWc layouts, MatMulNBits choices),
so the saved graph is tied to the device it was prepared on; the manifest records which.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from tmpdiff.engines.device import device_label
from tmpdiff.engines.ort import OrtEngine
from tmpdiff.formats.atomic import TEMP_SUFFIX, check_confined, sha256_file, temp_prefix
from tmpdiff.formats.disk_space import require_free_space
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import EngineEntry, Manifest, PrecisionEntry, engine_problem, verify_artifact


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def prepared_name(device: str) -> str:
    return f"model.ort-{device}.onnx"


def trt_ep_options(build_dir: Path, precision: str, manifest: Manifest, batch: tuple[int, int, int] = (1, 20, 40)) -> dict:
    """ONNX Runtime's TensorRT EP options for one precision: its engine and timing caches inside the build dir (so a
    process reuses the engines an earlier one built), profile shapes from the manifest's input specs (so a batch
    change within the range does not rebuild), and the int8 flag for graphs with int8 Q/DQ."""
    from tmpdiff.formats.precisions import get_precision

    cache = build_dir / precision / "trt-ep-cache"
    shapes = []
    for which in batch:
        dims = {s.name: [which if isinstance(d, str) else d for d in s.shape] for s in manifest.inputs}
        shapes.append(",".join(f"{name}:{'x'.join(map(str, dim))}" for name, dim in dims.items()))
    options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": "True",
               "trt_timing_cache_path": str(cache), "trt_profile_min_shapes": shapes[0], "trt_profile_opt_shapes": shapes[1],
               "trt_profile_max_shapes": shapes[2]}
    if precision != "fp32":  # fp16 kernels outside the Q/DQ, as the TensorRT plans' 16-bit base; fp32 stays fp32
        options["trt_fp16_enable"] = "True"
    if get_precision(precision).rewrite_kind == "int8":
        options["trt_int8_enable"] = "True"
    return options


def prepare_ort_engine(build_dir: Path, precision: str, entry: PrecisionEntry, device: str,
                       threads: int | None = None) -> EngineEntry:
    """Optimise `precision`'s ORT graph at its recorded level and save the result atomically. For the TensorRT EP the
    graph is not saved (ORT refuses to save graphs with compiled nodes): the engine is the exported graph itself, and
    TensorRT's own engine cache (in the build dir) holds what it compiles."""
    source = verify_artifact(build_dir, precision, entry)
    if device == "trt-ep":
        return EngineEntry(backend="ort", precision=precision, path=entry.onnx, sha256=entry.sha256,
                           source_sha256=entry.source_sha256("ort"), backend_version=ort_version(), device=device_label(device),
                           build_flags={"optimization": entry.ort_optimization, "device": device, "trt_ep_cache": True},
                           artifacts={k: v for k, v in entry.artifacts.items() if k == f"{entry.onnx}.data"})
    rel = f"{precision}/{prepared_name(device)}"
    final = build_dir / rel
    check_confined(final)  # a precision folder linked out of the build is never written through
    data = final.with_name(f"{final.name}.data")
    external = source.with_name(f"{source.name}.data").is_file()  # a large export makes a large engine
    require_free_space([(final.parent, planned_engine_bytes(source), f"the {precision} engine")],
                       f"building the {precision} engine", "free space in the build dir's filesystem")
    with tempfile.TemporaryDirectory(prefix=temp_prefix(final.name), suffix=TEMP_SUFFIX, dir=final.parent) as tmp_dir:
        tmp = Path(tmp_dir) / final.name
        OrtEngine(source, precision, device, threads, entry.ort_optimization, optimized_path=tmp, optimized_data=external)
        if not tmp.is_file() or (external and not (tmp.parent / data.name).is_file()):
            raise TmpdiffError("ONNX Runtime did not write the optimised graph", final)
        if external:  # the data first: a graph never points at a missing or older data file
            os.replace(tmp.parent / data.name, data)
        os.replace(tmp, final)
    flags = {"optimization": entry.ort_optimization, "device": device, "matmulnbits_accuracy_level": 1}
    if device == "cpu":
        from tmpdiff.engines.memory import measure_bytes_per_row

        flags["bytes_per_row"] = measure_bytes_per_row(final, OrtEngine(final, precision, optimization="disable").input_specs)
    return EngineEntry(
        backend="ort", precision=precision, path=rel, sha256=sha256_file(final), source_sha256=entry.source_sha256("ort"),
        backend_version=ort_version(), device=device_label(device), build_flags=flags,
        artifacts={data.relative_to(build_dir).as_posix(): sha256_file(data)} if external else {},
    )


def planned_engine_bytes(source: Path) -> int:
    """Bytes ORT's optimised CPU graph of `source` takes: the source's own (graph and `.data`) plus two per 16-bit
    float weight, which ORT's CPU kernels hold as fp32 (SD3-medium's fp16 graph: 4.17 GB -> 8.23 GB, measured), and
    5% for the optimised graph's own changes (the bundled DiT's fp32 / fp16 / int8 engines: within 1% of the plan)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(source), load_external_data=False)
    except (DecodeError, OSError) as exc:  # e.g. a truncated graph whose manifest hash was rewritten to match
        raise TmpdiffError(f"not a readable ONNX graph ({exc or type(exc).__name__}); re-run `tmpdiff export`",
                           source) from None
    half = sum(int(np.prod(t.dims, dtype=np.int64)) for t in graph.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16))
    data = source.with_name(f"{source.name}.data")
    return int(1.05 * (source.stat().st_size + (data.stat().st_size if data.is_file() else 0) + 2 * half))


def ort_engine_problem(build_dir: Path, manifest: Manifest, engine: EngineEntry, device: str) -> str | None:
    """Why a prepared engine does not fit this ORT version and device (None if it does)."""
    return engine_problem(build_dir, manifest, engine, backend_version=ort_version(), device=device_label(device))


def engine_state(build_dir: Path, manifest: Manifest, engine: EngineEntry) -> str | None:
    """Why a recorded engine cannot be used on this machine (None if it can): for ONNX Runtime engines, the one
    freshness rule with this ORT version and the device it was built for; for TensorRT plans without their TensorRT
    version and GPU, which are checked where TensorRT runs (`tmpdiff run --backend trt`)."""
    if engine.backend == "ort":
        return ort_engine_problem(build_dir, manifest, engine, engine.build_flags.get("device", "cpu"))
    return engine_problem(build_dir, manifest, engine)


def load_ort_engine(build_dir: Path, manifest: Manifest, engine: EngineEntry, device: str,
                    threads: int | None = None) -> OrtEngine:
    """Open a prepared engine after checking it is current for this export, ORT version and device."""
    problem = ort_engine_problem(build_dir, manifest, engine, device)
    if problem is not None:
        raise TmpdiffError(f"{engine.precision} engine {problem}: rebuild with `tmpdiff build {build_dir} --backend ort`",
                           build_dir / engine.path)
    if device == "trt-ep":
        return OrtEngine(build_dir / engine.path, engine.precision, device, threads,
                         optimization=engine.build_flags.get("optimization", "all"), runtime=True,
                         trt_ep=trt_ep_options(build_dir, engine.precision, manifest))
    # Already optimised at build time: skip re-optimisation on every load.
    return OrtEngine(build_dir / engine.path, engine.precision, device, threads, optimization="disable", runtime=True)
