"""`tmpdiff export`: a diffusers denoiser -> build/<model-id>/<precision>/ graphs + manifest.json.

Per precision the build dir holds `model.onnx` (the graph ONNX Runtime runs) and, for quantized
precisions, `model.trt.onnx` (modelopt's Q/DQ for TensorRT) plus the calibrated torch state. Every
artifact is keyed by content (model hash, precision, quantization config, calibration set, tool
versions): re-running an export with the same key is a no-op.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from tmpdiff.engines.memory import collecting_new_objects_only, release_freed_memory
from tmpdiff.export import census as graph_census
from tmpdiff.export.calibration_data import CalibrationRecipe, CalibrationSet, random_recipe
from tmpdiff.export.disk_plan import require_export_space
from tmpdiff.export.graph_rewrite import TRT_DOMAIN, ort_twin, remove_dead_nodes, trt_graph
from tmpdiff.export.half import FP32_KEPT, TRT_DTYPES, preload_autocast, to_half
from tmpdiff.export.half_convolutions import fp32_compute, fp32_convolutions
from tmpdiff.export.memory import activation_bytes_per_row
from tmpdiff.export.memory_plan import choose_base, tensor_shapes, weight_census
from tmpdiff.export.onnx_export import load_weights, traced
from tmpdiff.export.onnx_io import save_onnx
from tmpdiff.export.quantize import (
    build_config,
    check_kept_layers,
    config_digest,
    export_qdq_in_model_dtype,
    preload_modelopt,
    quantize,
    quantized_modules,
    quantizer_census,
    require_exportable,
    save_quantized_state,
)
from tmpdiff.export.time_embedding_export import kept_embedding_input, new_embedding_input
from tmpdiff.formats.atomic import atomic_path, directory_lock, sha256_file
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import (
    CHECK_IO_NAME,
    CHECK_SEED,
    Manifest,
    PrecisionEntry,
    SamplingInfo,
    TensorSpecModel,
    TimeEmbeddingInputEntry,
    load_manifest,
    precision_problems,
    recorded_model_hash,
    save_manifest,
)
from tmpdiff.formats.precisions import HIGH_PRECISION_PATTERNS, Precision, get_precision
from tmpdiff.models.adapter import DenoiserAdapter, model_dtype
from tmpdiff.models.loading import load_diffusers_model, read_model_config
from tmpdiff.models.registry import adapter_for_config
from tmpdiff.models.unet import resolve_time_ids

TRACE_OPSET = 19  # the opset torch's TorchScript exporter traces quantized modules at (modelopt's Q/DQ symbolics)
FLOAT32_TWIN_KINDS = ("int8", "int4")  # their twins from a 16-bit model compute in fp32 (`export.upcast`)


@dataclass
class ExportOutcome:
    precision: str
    onnx_path: Path
    skipped: bool
    seconds: float = 0.0
    entry: PrecisionEntry | None = None
    census_rows: list = field(default_factory=list)


def parse_precisions(text: str) -> list[str]:
    """'fp32,int8' -> ['fp32', 'int8']; unknown names are an error listing the known ones."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise TmpdiffError("no precision given")
    for name in names:
        get_precision(name)
    return names


def _versions() -> dict[str, str]:
    """The libraries a graph is made by: diffusers writes the model's forward pass and the calibration schedulers,
    onnx-graphsurgeon the graph rewrites."""
    import modelopt

    return {"tmpdiff": importlib.metadata.version("tmpdiff"), "torch": torch.__version__, "modelopt": modelopt.__version__,
            "onnx": onnx.__version__, "diffusers": importlib.metadata.version("diffusers"),
            "onnx_graphsurgeon": importlib.metadata.version("onnx_graphsurgeon")}


def _artifact_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _up_to_date(build_dir: Path, entry: PrecisionEntry | None, key: str) -> bool:
    return entry is not None and entry.key == key and not precision_problems(build_dir, entry)


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Relative L2 of `got` against `want`, which must have its shape (numpy would broadcast a (1, ...) or
    transposed output into a small number instead of refusing it)."""
    if np.shape(got) != np.shape(want):
        raise TmpdiffError(f"output of shape {tuple(np.shape(got))} compared with one of shape {tuple(np.shape(want))}")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


PARITY_SEEDS = (20_251, 20_252, 20_253)
LARGE_MODEL_PARAMETERS = 100_000_000


def _torch_outputs(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return module(*inputs.values()).float().numpy()


def _parity_inputs(adapter: DenoiserAdapter, parameters: int) -> list[dict[str, torch.Tensor]]:
    """The three fresh random batches every parity check uses; real-size models (SD1.5: ~8 s per row and pass on 2
    cores) check one row per seed, small models three."""
    rows = 1 if parameters > LARGE_MODEL_PARAMETERS else 3
    return [adapter.sample_inputs(adapter.default_dims(rows), seed=seed) for seed in PARITY_SEEDS]


@dataclass(frozen=True)
class ParityOutputs:
    """A torch module's outputs on the parity inputs, with those inputs: kept so the module itself can leave memory
    before its graph is rewritten and checked (a real-size model is not held beside its graphs)."""

    inputs: list[dict[str, torch.Tensor]]
    outputs: list[np.ndarray]


def parity_outputs(adapter: DenoiserAdapter, module: torch.nn.Module,
                   like: ParityOutputs | None = None) -> ParityOutputs:
    """`module`'s outputs on the parity inputs, or on `like`'s inputs (for the reference: the fp32 model's, computed
    once - a model quantized in place no longer has them)."""
    inputs = like.inputs if like is not None else _parity_inputs(adapter, sum(p.numel() for p in module.parameters()))
    return ParityOutputs(inputs, [_torch_outputs(module, batch) for batch in inputs])


def _parity(path: Path, precision: str, expected: ParityOutputs, reference: ParityOutputs) -> tuple[float, float, float]:
    """Median over the parity batches of ORT vs the torch module's `expected` outputs, ORT vs the `reference` outputs
    (fp32) and the module vs them.

    The median, because one batch can put an int8 activation on a rounding tie deep in a UNet, where
    ORT and torch round it differently and the difference grows through the up-blocks (seen: 3.7e-7,
    2.7e-4 and 3.0e-2 on three seeds of one model, with equal error vs fp32 on both sides).
    """
    from tmpdiff.engines.ort import OrtEngine

    engine = OrtEngine(path, precision, optimization=get_precision(precision).ort_optimization, priority_order=True)
    parity, error, torch_error = [], [], []
    for inputs, want, fp32 in zip(expected.inputs, expected.outputs, reference.outputs, strict=True):
        got = next(iter(engine.infer({k: v.numpy() for k, v in inputs.items()}).values()))
        parity.append(_relative_error(got, want))
        error.append(_relative_error(got, fp32))
        torch_error.append(_relative_error(want, fp32))
    return float(np.median(parity)), float(np.median(error)), float(np.median(torch_error))


def _trt_parity(path: Path, has_trt_ops: bool, precision: str, expected: ParityOutputs,
                reference: ParityOutputs, trt_dtype: str) -> float | None:
    """The saved TensorRT graph run by ONNX Runtime on CPU vs the fake-quant torch model (`_parity`), where ONNX
    Runtime can run it (standard ops in fp16: int8, fp8); None for graphs with trt:: ops (int4) or bf16 compute (no
    CPU kernels for its Q/DQ). The 16-bit graph must stay within
    the fp16 tolerance of the fp32 fake-quant model, or - in deep graphs where fp16 rounding flips quantized
    activations (UNets) - be of the same quality: at most 1.5x as far from the fp32 model as the fake-quant model is
    (a graph with missing or wrong quantizers is an order of magnitude off); and it must carry the quantization: at
    least 0.6x as far from fp32 as the fake-quant model (`check_half_parity`); else export fails."""
    if trt_dtype != "float16" or has_trt_ops:
        return None
    error, vs_fp32, quantization_error = _parity(path, precision, expected, reference)
    check_half_parity(error, vs_fp32, quantization_error, f"{precision}: the TensorRT graph", "the fake-quant model", path)
    return error


# The TensorRT graph carries the quantization: at least this share of the fake-quant model's distance from fp32.
# Measured as vs_fp32 / quantization error (median of the parity batches): honest 16-bit graphs 0.95..5.6 (tiny DiT
# int8 1.50 / fp8 1.05, SD3 2.9 / 1.3, Flux 5.6 / 2.1, UNets int8 1.00..1.02 / fp8 0.97..0.99, bundled DiT 0.95 /
# 1.16, from 16 bits 1.04, bundled t2i 1.04 / 0.99); the plain fp16 graph (no quantization) checked in their place
# 0.01..0.35 (DiT 0.12 / 0.04, SD3 0.35 / 0.10, UNets 0.01..0.02, bundled and t2i 0.01..0.04) - except Flux (5.9 /
# 2.0): its fp16 rounding (6.1e-3 from fp32) is larger than its quantization error (1.0e-3 / 3.1e-3), and nothing
# measured here tells its plain graph from its quantized one. The distance from the fake-quant model cannot either
# (DiT int8: honest 4.5e-3, plain 3.4e-3).
CARRIES_QUANTIZATION = 0.6  # between the plain graphs (<= 0.35) and the honest ones (>= 0.95)


def check_half_parity(error: float, vs_fp32: float, quantization_error: float, graph: str, model: str,
                      path: Path) -> None:
    """The 16-bit TensorRT graph's acceptance rule (on ONNX Runtime), two-sided: within the fp16 tolerance of the
    fake-quant `model`, or at most 1.5x as far from fp32 as that model is (rounding ties in deep graphs); and at least
    `CARRIES_QUANTIZATION` x as far from fp32 as that model is (a graph missing its quantization, even a plain fp16
    graph, is near fp32 and only the fake-quant model's distance from it). Else a TmpdiffError naming `graph`."""
    tolerance = get_precision("fp16").parity_tolerance
    if not np.isfinite(error) or not (error <= tolerance or vs_fp32 <= 1.5 * quantization_error):
        raise TmpdiffError(f"{graph} differs from {model} by {error:.2e} on ONNX Runtime (fp16 tolerance "
                           f"{tolerance:.0e}); it is {vs_fp32:.2e} from fp32, {model} {quantization_error:.2e}", path)
    if not vs_fp32 >= CARRIES_QUANTIZATION * quantization_error:
        raise TmpdiffError(f"{graph} is {vs_fp32:.2e} from fp32 on ONNX Runtime, {model} {quantization_error:.2e}: "
                           f"closer than {CARRIES_QUANTIZATION:g}x, it does not carry the quantization", path)


def _record_check_io(path: Path, precision: str, adapter: DenoiserAdapter, out: Path) -> None:
    """The graph's output on one fixed input, saved beside it: `tmpdiff check` runs the built engines on the
    same input and compares, so a swapped or damaged engine cannot pass as long as its hash was updated."""
    from safetensors.numpy import save_file

    from tmpdiff.engines.ort import OrtEngine

    engine = OrtEngine(path, precision, optimization=get_precision(precision).ort_optimization, priority_order=True)
    inputs = {k: v.numpy() for k, v in adapter.sample_inputs(adapter.default_dims(2), seed=CHECK_SEED).items()}
    outputs = engine.infer(inputs)
    tensors = {f"input.{k}": v for k, v in inputs.items()} | {f"output.{k}": v for k, v in outputs.items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp))


def export_model(
    model_dir: Path,
    out_root: Path,
    precisions: list[str],
    model_id: str | None = None,
    calibration: CalibrationRecipe | None = None,
    keep_high_precision: tuple[str, ...] = HIGH_PRECISION_PATTERNS,
    on_progress: Callable[[str], None] = lambda _: None,
    sampling: SamplingInfo | None = None,
    graph_sizes: dict[str, int | None] | None = None,
    wait: float = 3600.0,
    trt_dtype: str = "float16",
    memory_check: bool = True,
    time_embedding_input: bool = False,
    load_dtype: str = "auto",
    replace: bool = False,
) -> tuple[Path, list[ExportOutcome]]:
    """Export each precision of a diffusers denoiser directory; artifacts with an unchanged key are kept.

    A build directory holding another model's build (`check_build_model`) is refused unless `replace`.

    `graph_sizes` ({"text_len": N, "sample_size": N, "time_ids": N}, None entries ignored) overrides the fixed sizes
    the graph takes, as the same keys in the model's config.json would (an SDXL-style UNet's time ids otherwise come
    from its pipeline directory: `models.unet.resolve_time_ids`). Holds the build directory's lock
    throughout, so concurrent exports/builds are serialised (waiting at most `wait` seconds, and saying so).
    `trt_dtype` is the 16-bit type the quantized TensorRT graphs compute in outside their Q/DQ (float16, bfloat16).
    With `memory_check`, an export whose planned peak memory (`export.memory_plan`) exceeds what is available is
    refused before the model is loaded, and each precision whose planned files (`export.disk_plan`) do not fit the
    disk before its work; `load_dtype` (`memory_plan.choose_base`) is the dtype the model is loaded,
    quantized and checked in: "auto" takes float16 when float32 would not fit. With `time_embedding_input` the
    graphs take the per-block time embeddings (`models.time_embedding_input`) instead of the timestep, and the build
    keeps the model's own table of them.
    """
    specs = [get_precision(p) for p in precisions]  # unknown names fail before anything is created
    for spec in specs:
        require_exportable(spec)
    if trt_dtype not in TRT_DTYPES:
        raise TmpdiffError(f"unknown --trt-dtype {trt_dtype!r} (known: {', '.join(TRT_DTYPES)})")
    options = {k: v for k, v in (graph_sizes or {}).items() if v is not None}
    config = resolve_time_ids(model_dir, read_model_config(model_dir) | options)
    adapter = adapter_for_config(config, model_dir / "config.json", options)
    problem = adapter.unsupported()
    if problem is not None:
        raise TmpdiffError(problem, model_dir / "config.json")
    if time_embedding_input:
        from tmpdiff.models.time_sites import check_supported

        check_supported(adapter.architecture)  # before anything is written
    check_sampling_size(adapter, sampling, "sample_size" in options, model_dir)
    build_dir = export_build_dir(model_dir, out_root, model_id)
    model_id = build_dir.name
    if out_root.exists() and not out_root.is_dir():
        raise TmpdiffError("--out must be a directory (the build root), found a file", out_root)
    if build_dir.exists() and not build_dir.is_dir():
        raise TmpdiffError("the build directory's path holds a file", build_dir)
    check_no_foreign_build(build_dir, replace)  # before the lock: taking it marks the folder as a build
    if any(spec.modelopt_cfg is not None for spec in specs):
        check_kept_layers(tensor_shapes(model_dir), keep_high_precision)  # before any precision is written
    kept_base = recorded_base(build_dir, specs) if load_dtype == "auto" and not replace else None
    # with a kept base the memory is planned when the model is loaded, for what is exported then: an up-to-date
    # build needs no memory, and whether it is up to date never depends on the memory free at the time
    base = choose_base(model_dir, specs, requested=kept_base or load_dtype,
                       memory_check=memory_check and kept_base is None)
    if any(spec.rewrite_kind is not None for spec in specs):
        preload_autocast()  # a native extension: imported before any work, never while a signal may interrupt it
        preload_modelopt()
    with directory_lock(build_dir, wait, on_wait=on_progress), collecting_new_objects_only():
        return _export_locked(model_dir, build_dir, model_id, specs, config, adapter, calibration, keep_high_precision,
                              on_progress, sampling, trt_dtype, base, time_embedding_input, memory_check, replace,
                              plan_at_load=memory_check and kept_base is not None)


def recorded_base(build_dir: Path, specs: list[Precision]) -> str | None:
    """The dtype the build's entries of these precisions were made from, when they agree: what `--load-dtype auto`
    keeps. None for a new build, an unreadable manifest, entries made from different dtypes, or a 16-bit base when
    fp32 is asked for (it cannot be made from one)."""
    if not (build_dir / "manifest.json").is_file():
        return None
    try:
        manifest = load_manifest(build_dir)
    except TmpdiffError:
        return None
    dtypes = {manifest.precisions[spec.name].reference_dtype for spec in specs if spec.name in manifest.precisions}
    if len(dtypes) != 1 or (dtypes == {"float16"} and any(spec.name == "fp32" for spec in specs)):
        return None
    return dtypes.pop()


def check_sampling_size(adapter: DenoiserAdapter, sampling: SamplingInfo | None, option: bool, model_dir: Path) -> None:
    """A class-conditional model samples at its sampling info's image_size (tmpdiff_model.json): graphs of another
    size would export and pass `check`, then fail in `run` (and quantized ones calibrate on the other size)."""
    sides = [int(side) for side in adapter.latent_sides()]
    if sampling is None or all(side == sampling.image_size for side in sides):
        return
    size = sides[0] if len(set(sides)) == 1 else sides
    given = f"--sample-size {size}" if option else f"sample_size {size} in {model_dir / 'config.json'}"
    raise TmpdiffError(f"{given} differs from the image_size {sampling.image_size} the model samples at (its "
                       f"tmpdiff_model.json): a class-conditional model's graphs take its own size" +
                       ("; leave --sample-size out" if option else ""))


def export_build_dir(model_dir: Path, out_root: Path, model_id: str | None) -> Path:
    """Where an export of `model_dir` goes: OUT/<model-id> (default: the model directory's name); a model id is one
    folder name, never a path."""
    name = model_id or model_dir.resolve().name
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise TmpdiffError(f"--model-id {name!r} must be one folder name (it names OUT/<model-id>), not a path")
    build_dir = out_root / name
    model, target = model_dir.resolve(), build_dir.resolve()
    # the model's folder, and the pipeline folder holding it (its other components are read at run time)
    for read in (model, *([model.parent] if (model.parent / "model_index.json").is_file() else [])):
        if target.is_relative_to(read):
            raise TmpdiffError(f"the build directory would be inside {read}, which this export reads: choose an --out "
                               "outside it", build_dir)
    return build_dir


def check_build_model(build_dir: Path, model_dir: Path, replace: bool, manifest: Manifest | None = None,
                      model_hash: str | None = None) -> None:
    """Refuse to export into a build directory whose manifest records another model (other weights or config): its
    engines and schedules would be dropped by surprise. `replace` (`--force`) lets the export start a new build.
    `manifest` and `model_hash` when the caller has them (hashing a real-size model's weights takes seconds)."""
    if replace:
        return
    if manifest is None:
        manifest = _existing_manifest(build_dir, replace)
        if manifest is None:
            check_no_foreign_build(build_dir, replace)
            return
    if (model_hash or recorded_model_hash(model_dir, manifest.model_sha256)) != manifest.model_sha256:
        raise TmpdiffError(f"holds the build of another model ({manifest.model_id!r}, {manifest.architecture}, exported "
                           f"from other weights or config than {model_dir}): pass --force to replace that build, or "
                           "--out / --model-id for a new one", build_dir / "manifest.json")


def check_no_foreign_build(build_dir: Path, replace: bool) -> None:
    """Refuse to export into a folder that holds files at a build's names (a precision's folder, mixed/) but neither a
    manifest nor tmpdiff's lock: someone else made them (an export, even a killed one, takes the lock before it
    writes anything), and the export would replace them. `replace` (`--force`) allows it."""
    from tmpdiff.formats.atomic import LOCK_NAME
    from tmpdiff.formats.precisions import PRECISIONS

    if replace or not build_dir.is_dir() or (build_dir / "manifest.json").exists() or (build_dir / LOCK_NAME).exists():
        return
    found = sorted(f"{name}/" for name in (*PRECISIONS, "mixed") if os.path.lexists(build_dir / name))
    if found:
        raise TmpdiffError(f"holds {', '.join(found)} but no manifest.json: not a tmpdiff build, and the export would "
                           "write into those folders; pass --force to write there anyway, or --out / --model-id for a "
                           "new build", build_dir)


def check_restart_drops(build_dir: Path, manifest: Manifest, specs: list[Precision]) -> None:
    """An export whose graphs take other inputs than the build's (--time-embedding-input, --text-len, --sample-size)
    starts the build over: refused when that would drop what this export does not make again (other precisions,
    built engines, deployed layer configurations); `--force` starts it over anyway."""
    remade = {spec.name for spec in specs}
    dropped = [f"{name} (exported)" for name in manifest.precisions if name not in remade]
    dropped += [f"{len(manifest.engines)} built engine{'s' * (len(manifest.engines) != 1)}"] if manifest.engines else []
    dropped += [f"{len(manifest.mixed)} deployed layer configuration{'s' * (len(manifest.mixed) != 1)}"] \
        if manifest.mixed else []
    if dropped:
        raise TmpdiffError(f"this export's graphs take other inputs than the build's (--time-embedding-input, "
                           f"--text-len or --sample-size differ), so it would start the build over and drop "
                           f"{', '.join(dropped)}: export into another --out / --model-id, or pass --force to start "
                           "over", build_dir / "manifest.json")


def _export_locked(
    model_dir: Path,
    build_dir: Path,
    model_id: str,
    specs: list[Precision],
    config: dict,
    adapter: DenoiserAdapter,
    calibration: CalibrationRecipe | None,
    keep_high_precision: tuple[str, ...],
    on_progress: Callable[[str], None],
    sampling: SamplingInfo | None,
    trt_dtype: str,
    base: str,
    time_embedding_input: bool = False,
    space_check: bool = True,
    replace: bool = False,
    plan_at_load: bool = False,
) -> tuple[Path, list[ExportOutcome]]:
    """`plan_at_load`: check `base`'s memory plan when the model is first loaded, for the precisions not up to date
    (all of them while those are not known yet)."""
    manifest = _existing_manifest(build_dir, replace)
    model_hash = recorded_model_hash(model_dir, None if manifest is None else manifest.model_sha256)
    if manifest is not None:  # as the build directory is now that we hold its lock
        check_build_model(build_dir, model_dir, replace, manifest, model_hash)
    state: dict = {}

    def model() -> torch.nn.Module:
        if "model" not in state:
            if plan_at_load and not state.get("planned"):
                choose_base(model_dir, state.get("stale", specs), requested=base)  # refuses with the numbers
                state["planned"] = True
            if base != "float32":
                on_progress(f"loading the model in {base}: every precision is made and checked from it")
            state["model"] = load_diffusers_model(model_dir, dtype=getattr(torch, base))
        return state["model"]

    if manifest is not None and manifest.model_sha256 == model_hash and not replace:
        kind_changes = (manifest.time_embedding_input is not None) != time_embedding_input
        base_inputs = [TensorSpecModel.of(s) for s in adapter.input_specs()]
        if kind_changes or (not time_embedding_input and manifest.inputs != base_inputs):
            check_restart_drops(build_dir, manifest, specs)  # before the time-embedding table is written
    embedding_entry = None
    if time_embedding_input:  # the last export's input and table when still valid (no model load), else new ones
        kept = None if manifest is None else kept_embedding_input(build_dir, manifest, adapter, model_hash, sampling)
        adapter, embedding_entry = kept or new_embedding_input(build_dir, adapter, model(), sampling)
    if manifest is not None:
        inputs = [TensorSpecModel.of(s) for s in adapter.input_specs()]
        if manifest.model_sha256 != model_hash or manifest.inputs != inputs:
            if not replace:
                check_restart_drops(build_dir, manifest, specs)
            manifest = None  # another model's (or changed weights' or graph sizes') artifacts: rebuild everything
    if manifest is None:
        manifest = Manifest(
            model_id=model_id,
            architecture=adapter.architecture,
            model_sha256=model_hash,
            denoiser_config=dict(config),
            inputs=[TensorSpecModel.of(s) for s in adapter.input_specs()],
            outputs=[TensorSpecModel.of(s) for s in adapter.output_specs()],
            time_embedding_input=embedding_entry,
        )
    if embedding_entry is not None and manifest.time_embedding_input != embedding_entry:
        manifest.time_embedding_input = embedding_entry  # a table written again: every precision's key follows it
    if sampling is not None and manifest.sampling != sampling:
        manifest.sampling = sampling
        if manifest.precisions:
            save_manifest(build_dir, manifest)

    recipe = calibration or random_recipe()

    def reference() -> ParityOutputs:
        if "reference" not in state:  # the loaded model's outputs on the parity inputs: fp32 (or its 16-bit base)
            with fp32_compute():  # a 16-bit model's CPU convolutions and GEMMs (`half_convolutions`)
                state["reference"] = parity_outputs(adapter, adapter.export_module(model(), model_dtype(model())))
        return state["reference"]

    def calib() -> CalibrationSet:
        if "calib" not in state:
            on_progress("capturing calibration inputs")
            with fp32_compute():
                state["calib"] = recipe.capture(model(), adapter)
        return state["calib"]

    versions = _versions()
    outcomes = []
    parameters, conv_share = weight_census(model_dir) if space_check else (0, 0.0)  # the headers, read once
    keys = {spec.name: _precision_key(spec, model_hash, versions, base, embedding_entry, keep_high_precision,
                                      recipe.description, trt_dtype) for spec in specs}
    state["stale"] = [spec for spec in specs
                      if not _up_to_date(build_dir, manifest.precisions.get(spec.name), keys[spec.name])]
    for spec in specs:
        key = keys[spec.name]
        entry = manifest.precisions.get(spec.name)
        if _up_to_date(build_dir, entry, key):
            on_progress(f"{spec.name}: up to date, skipped")
            outcomes.append(ExportOutcome(spec.name, build_dir / entry.onnx, skipped=True, entry=entry))
            continue
        if space_check:
            require_export_space(spec, parameters, base, conv_share, build_dir)
        on_progress(f"{spec.name}: exporting")
        started = time.perf_counter()
        if spec.modelopt_cfg is None:
            entry, rows = _export_plain(spec, model(), adapter, build_dir, key, reference())
            if spec.name == "fp32":
                manifest.activation_bytes_per_row = activation_bytes_per_row(build_dir / entry.onnx)
        else:
            quant_config = build_config(spec, model(), keep_high_precision)
            calibration_set, fp32_outputs = calib(), reference()
            # quantized in place (a real-size model is not held twice); the next precision loads a fresh one
            entry, rows = _export_quantized(spec, lambda: state.pop("model"), adapter, build_dir, key, quant_config,
                                            calibration_set, trt_dtype, fp32_outputs,
                                            lambda stage, name=spec.name: on_progress(f"{name}: {stage}"))
        seconds = time.perf_counter() - started
        entry.reference_dtype = base
        manifest.precisions[spec.name] = entry
        save_manifest(build_dir, manifest)
        outcomes.append(ExportOutcome(spec.name, build_dir / entry.onnx, False, seconds, entry, rows))
    return build_dir, outcomes


def _existing_manifest(build_dir: Path, replace: bool) -> Manifest | None:
    """The build's manifest; None for a new build, or with `replace` (`--force`) for one that cannot be read, since
    the export starts that build over (without it, the error says so)."""
    if not (build_dir / "manifest.json").is_file():
        return None
    try:
        return load_manifest(build_dir)
    except TmpdiffError as exc:
        if replace:
            return None
        reason = str(exc).removeprefix(f"{exc.path}: ") if exc.path is not None else str(exc)
        raise TmpdiffError(f"{reason}; pass --force to start this build over", exc.path) from None


def _precision_key(spec: Precision, model_hash: str, versions: dict, base: str,
                   embedding_entry: TimeEmbeddingInputEntry | None, keep_high_precision: tuple[str, ...],
                   recipe_description: dict, trt_dtype: str) -> str:
    """What one precision's artifacts are made from: an unchanged key means the recorded artifacts are current."""
    key_parts = {"model": model_hash, "precision": spec.name, "versions": versions, "opset": spec.ort_opset}
    if base != "float32":
        key_parts["base"] = base  # checked against a 16-bit torch model, not the fp32 one
        if spec.rewrite_kind in FLOAT32_TWIN_KINDS:  # Half Q/DQ (int8) and the fp32 twin: not what older exports made
            key_parts["twin"] = "float32"
    if embedding_entry is not None:
        key_parts["time_embedding_input"] = {"slots": embedding_entry.slots, "table": embedding_entry.sha256}
    if spec.modelopt_cfg is not None:
        # by recipe, not by result: the config follows from (model, modelopt config, kept layers), the data from
        # (model, recipe), so checking freshness needs neither the model nor a capture
        key_parts |= {"config": {"modelopt": spec.modelopt_cfg, "keep": list(keep_high_precision)},
                      "calibration": recipe_description, "trt_dtype": trt_dtype,
                      "trt_fp32": FP32_KEPT}  # what the 16-bit TensorRT graph keeps in fp32 (older graphs: nothing)
    return _artifact_key(key_parts)


def _export_plain(spec: Precision, model: torch.nn.Module, adapter: DenoiserAdapter, build_dir: Path,
                  key: str, reference: ParityOutputs) -> tuple[PrecisionEntry, list]:
    """fp32 / fp16: one graph serves TensorRT and ONNX Runtime."""
    dtype = torch.float16 if spec.name == "fp16" else torch.float32
    if dtype != model_dtype(model) and model_dtype(model) != torch.float32:
        raise TmpdiffError(f"{spec.name} cannot be exported from a model loaded in {model_dtype(model)}")
    # the fp16 graph traces a half copy, unless the model itself was loaded in 16 bits (fp32 would not fit)
    module = adapter.export_module(copy.deepcopy(model) if dtype != model_dtype(model) else model, dtype)
    rel = f"{spec.name}/model.onnx"
    # fp16 convolutions compute in fp32 on CPU while tracing and checking; the graph keeps fp16 Convs
    with fp32_convolutions(), traced(module, adapter, spec.ort_opset) as (proto, data_dir):
        remove_dead_nodes(proto)
        written = save_onnx(proto, build_dir / rel, data_dir=data_dir)  # a large model's weights stream, never loaded
    del proto
    release_freed_memory()
    # traced at the loaded model's own dtype, the module computes exactly what the reference outputs are
    with fp32_compute():
        expected = reference if dtype == model_dtype(model) else parity_outputs(adapter, module, reference)
    return _checked_entry(spec, build_dir, rel, rel, key, adapter, expected, reference, extra_files=written), []


def _export_quantized(spec: Precision, take_model: Callable[[], torch.nn.Module], adapter: DenoiserAdapter,
                      build_dir: Path, key: str, quant_config: dict, calibration: CalibrationSet, trt_dtype: str,
                      reference: ParityOutputs, on_stage: Callable[[str], None] = lambda _: None
                      ) -> tuple[PrecisionEntry, list]:
    """modelopt fake quant (of the model `take_model` hands over, in place) -> ORT twin (standard ops, fp32) +
    TensorRT graph (Q/DQ, `trt_dtype` compute elsewhere), both parity-checked against the fake-quant model, errors
    against the `reference` outputs.

    What the checks need from the torch model (its outputs, its quantizers) is taken before it is traced; the model
    leaves memory once its graph exists, so the graph rewrites never share memory with it (handed over by a callable:
    an argument would stay referenced by the caller's frame for the whole call)."""
    model = take_model()
    dtype = model_dtype(model)  # float32, or the 16 bits a model too large for fp32 was loaded in
    on_stage("calibrating the quantizers")
    with fp32_compute():
        quantize(model, quant_config, calibration.batches,
                 lambda m, batch: adapter.export_module(m, dtype)(*batch.values()), in_place=True)
    # the search's transient tensors leave freed heap behind (an SDXL-size int4 search grew 11.2 -> 13.3 GiB):
    # hand it back before the trace stacks the graphs on top
    release_freed_memory()
    directory = build_dir / spec.name
    save_quantized_state(model, quant_config, directory)
    with fp32_compute():
        expected = parity_outputs(adapter, adapter.export_module(model, dtype), reference)
    quantizers = quantizer_census(model)
    weight_modules, input_modules = quantized_modules(model)
    if dtype == torch.float16 and spec.rewrite_kind == "int8":
        export_qdq_in_model_dtype(model)
    module = adapter.export_module(model, dtype)
    on_stage("tracing the fake-quant model")
    with fp32_convolutions(), traced(module, adapter, TRACE_OPSET) as (raw, data_dir):  # opsets: from the rewrites
        load_weights(raw, data_dir)
    del model, module  # the context manager held them until here
    release_freed_memory()
    kind = spec.rewrite_kind
    rel, trt_rel = f"{spec.name}/model.onnx", f"{spec.name}/model.trt.onnx"
    # One graph at a time, each saved before the next is made (a large graph's weights leave memory when it is
    # saved): the twin first (its weights are int8/fp8/int4), then the TensorRT graph, converted to 16 bits once the
    # traced graph is gone.
    # a 16-bit model's int8 (Half Q/DQ) / int4 (fp32 Q/DQ handing fp32 on) twin computes in fp32 (`export.upcast`)
    on_stage("writing the ONNX Runtime twin")
    twin, twin_stats = ort_twin(raw, kind, spec.ort_opset, float32=dtype != torch.float32 and kind in FLOAT32_TWIN_KINDS)
    written = [*save_onnx(twin, build_dir / rel), directory / "quant_state.safetensors", directory / "quant_config.json"]
    del twin
    release_freed_memory()
    on_stage(f"writing the TensorRT graph ({trt_dtype} outside the quantized layers)")
    trt_proto, trt_stats = trt_graph(raw, kind, spec.trt_opset)
    del raw
    release_freed_memory()
    trt_proto = to_half(trt_proto, str(build_dir / spec.name), trt_dtype)
    written += save_onnx(trt_proto, build_dir / trt_rel)

    rows = graph_census.census(trt_proto)
    problems = graph_census.missing_quantization(rows, weight_modules, input_modules)
    if problems:
        raise TmpdiffError(f"{spec.name}: graph census found unquantized layers: {'; '.join(problems[:5])}",
                           build_dir / trt_rel)

    compute_dtypes = graph_census.compute_dtypes(trt_proto)
    has_trt_ops = any(n.domain == TRT_DOMAIN for n in trt_proto.graph.node)
    del trt_proto  # checked from its file: its weights are not held beside the session running it
    release_freed_memory()
    on_stage("checking the TensorRT graph and the twin on ONNX Runtime")
    quantization = {
        "modelopt_config": spec.modelopt_cfg,
        "config_sha256": config_digest(quant_config),
        "calibration": calibration.description,
        "quantizers": quantizers,
        "census": graph_census.summarize(rows),
        "trt_compute_dtypes": compute_dtypes,
        "trt_base": trt_dtype,
        "trt_parity_error": _trt_parity(build_dir / trt_rel, has_trt_ops, spec.name, expected, reference, trt_dtype),
        "rewrite": {"trt": trt_stats, "ort": twin_stats},
        "state": {"weights": f"{spec.name}/quant_state.safetensors", "config": f"{spec.name}/quant_config.json"},
    }
    entry = _checked_entry(spec, build_dir, rel, trt_rel, key, adapter, expected, reference, quantization, written,
                           half_reference=dtype != torch.float32)
    return entry, rows


def _checked_entry(spec: Precision, build_dir: Path, rel: str, trt_rel: str, key: str, adapter: DenoiserAdapter,
                   expected: ParityOutputs, reference: ParityOutputs, quantization: dict | None = None,
                   extra_files: list[Path] = (), half_reference: bool = False) -> PrecisionEntry:
    """The manifest entry of a saved graph (ORT graph `rel`, TensorRT graph `trt_rel`) once its parity with the torch
    module's `expected` outputs holds (errors also against `reference`, the fp32 model's); every other file written
    for it (external data, quantizer state) is hashed too."""
    parity, error, torch_error = _parity(build_dir / rel, spec.name, expected, reference)
    _check_parity(spec.name, parity, error, torch_error, build_dir / rel, half_reference=half_reference)
    check_io = build_dir / spec.name / CHECK_IO_NAME
    _record_check_io(build_dir / rel, spec.name, adapter, check_io)
    extra_files = [*extra_files, check_io]
    sha = sha256_file(build_dir / rel)
    return PrecisionEntry(
        onnx=rel, sha256=sha, trt_onnx=trt_rel, trt_sha256=sha if trt_rel == rel else sha256_file(build_dir / trt_rel),
        opset=spec.ort_opset, key=key, parity_error=parity, error_vs_fp32=error, torch_error_vs_fp32=torch_error,
        ort_optimization=spec.ort_optimization, quantization=quantization or {},
        artifacts={path.relative_to(build_dir).as_posix(): sha256_file(path) for path in extra_files
                   if path.relative_to(build_dir).as_posix() not in (rel, trt_rel)},
    )


# The twin's acceptance (`parity_ok`), measured on every export the tests make (median over the three parity
# batches; "share" = twin vs fake-quant torch / fake-quant torch vs fp32, "quality" = (twin's error vs fp32 - torch's)
# / torch's), fp32 loads unless noted:
#   honest twins                       parity     torch err   share   quality
#   tiny DiT/SD3/Flux/PixArt/Sana int4  <=2.6e-7   5.9e-3..2.6e-2  0    0.000  (UNets: 6.5e-7, 0)
#   tiny DiT/SD3/Flux int8, fp8         <=1.2e-4   1.0e-3..1.2e-2 <=0.11 <=0.004
#   bundled DiT int8 / fp8 (trained)    3.8e-4/6.0e-4  1.7e-2/2.8e-2  0.022  0.001  (one batch of three: a tie)
#   bundled t2i int8 / fp8 (trained)    9.4e-3/8.1e-4  1.4e-2/2.1e-2  0.69/0.04  0.003  (ties on all three batches)
#   tiny UNets int8 / fp8               1.8e-2..4.1e-2 3.4e-2..9.1e-2 0.44..0.59 <=0.050
#   bundled DiT int8 from 16 bits       1.2e-2     1.4e-2      0.84    0.050
#     over 10 calibration sets (scripts/bench_half_parity.py): ORT / torch error int8 0.87..1.18 (sd 0.08), fp8
#     0.80..1.26 (sd 0.13), int4 0.99..1.01 (sd 0.006)
#   16-bit loads, real size (README)    SD3-medium int8 0.84, fp8 0.59, int4 0.16; SDXL-size int8 1.15, fp8 0.88,
#                                       int4 0.034 (the twin computes in fp32, torch in fp16)
#   corrupted twins (tiny SD3, the reviewer's scripts)
#   int8 scales x1.5 on 1..7 of 21      2.1e-3..9.9e-3  7.2e-4  2.8..13.7  1.9..12.8
#   int4 scales shifted on 1..8 of 21   2.3e-4..2.1e-3  4.7e-3  0.048..0.45  0.001..0.10
#   layer configurations (`export.mixed`: vs the super-network, errors vs its fp32 configuration; bundled DiT at two
#   calibrations and t2i, 9 configurations each of int8/fp8/int4 with fp32 layers)
#   honest mixed twins                  <=4.3e-3   4.4e-3..3.9e-2 <=0.28 <=0.025  (int4 + fp32 only: <=3.8e-7, 0)
#   scales damaged on 1, 3 or 7 layers  783 twins, 221 under the 2e-2 the mixed check had; 78 pass the rule, all in
#                                       configurations with int8/fp8 layers (t2i 75, DiT 3), one layer damaged
# So: a twin computes the fake-quant maths in fp32, float rounding apart (`EXACT_PARITY`). Activation-quantized kinds
# (int8/fp8) put activations on rounding ties that ORT and torch round apart, moving the output by up to another draw
# of the quantization error (`TIE_SHARE`: two independent draws of equal size are sqrt(2) x apart; a real-size
# random-weight SD1.5 UNet measured 5.7e-2 apart, both 5.0e-2 from fp32) - in trained transformers too (bundled t2i),
# not only UNets; what tells a wrong twin from another draw is its own error vs the reference (`QUALITY`; for int8
# and fp8 from a 16-bit load, where fp16 puts activations on ties far more often and twin and torch compute apart,
# `HALF_TIE_QUALITY`, about 3 sd of the spread above: at 0.15 the bundled DiT's default calibration was refused at
# int8, and 2 of 10 calibration sets at fp8). int4 is
# weight-only: from fp32 exact (its corruptions start at 2.3e-4, within 15% quality and a small share of its error,
# so neither would catch them); from a 16-bit load torch rounds to 16 bits where the twin does not
# (`HALF_INT4_SHARE`). A layer configuration's twin gets the largest allowance among its kinds (`twin_parity_ok`).
# Not separable: an int4 corruption the size of that 16-bit rounding (the shares above: 0.05..0.45, SD3-medium's
# honest 0.16); nor, in a configuration with int8/fp8 layers, one damaged layer that moves the output less than a
# tie's share of the error (the 78 above: the t2i's layers move it less than the DiT's; its int4 layers' error counts
# in that share, though they do not tie).
EXACT_PARITY = 1e-4
TIE_SHARE = 1.5
HALF_INT4_SHARE = 0.5
QUALITY = 0.15
HALF_TIE_QUALITY = 0.4


def parity_ok(precision: str, parity: float, error: float, torch_error: float | None, *,
              half_reference: bool = False) -> bool:
    """Whether ONNX Runtime's graph passes its parity check: `parity` from the torch model it came from, `error` and
    `torch_error` (graph's and torch's) from the reference model (fp32, or the 16-bit load with `half_reference`).

    Plain graphs (fp32, fp16) match within the precision's tolerance. A quantized twin computes the fake-quant maths:
    it must keep torch's quantization quality (its own error within `QUALITY` of torch's, `HALF_TIE_QUALITY` for
    int8/fp8 from a 16-bit load) and be at most as far from torch as its kind allows, relative to the quantization
    error (table above): float rounding only (int4 from fp32), 16-bit rounding (int4 from a 16-bit load), another
    draw of the same size (int8/fp8: rounding ties).
    """
    spec = get_precision(precision)
    if spec.rewrite_kind is None:
        return bool(np.isfinite(parity)) and parity <= spec.parity_tolerance
    return twin_parity_ok({spec.rewrite_kind}, parity, error, torch_error, half_reference=half_reference)


def twin_parity_ok(kinds: Collection[str], parity: float, error: float, torch_error: float | None, *,
                   half_reference: bool = False) -> bool:
    """`parity_ok` for a quantized twin holding the rewrite `kinds` (int8, fp8, int4): one for a uniform precision,
    those of its layers for a layer configuration's (`export.mixed`, against the super-network and its fp32
    configuration), which is allowed the largest share among its kinds (an int8 or fp8 layer's rounding tie moves the
    whole output, int4 layers included; a configuration of int4 and fp32 layers is exact as uniform int4 is)."""
    if not kinds:
        raise ValueError("a quantized twin holds at least one rewrite kind")
    if not np.isfinite(parity) or torch_error is None or not (np.isfinite(error) and np.isfinite(torch_error)):
        return False
    quality = max(HALF_TIE_QUALITY if half_reference and kind != "int4" else QUALITY for kind in kinds)
    if abs(error - torch_error) > quality * torch_error + EXACT_PARITY:
        return False
    share = max((HALF_INT4_SHARE if half_reference else 0.0) if kind == "int4" else TIE_SHARE for kind in kinds)
    return parity <= max(EXACT_PARITY, share * torch_error)


def _check_parity(precision: str, parity: float, error: float, torch_error: float, path: Path, *,
                  half_reference: bool = False) -> None:
    if not parity_ok(precision, parity, error, torch_error, half_reference=half_reference):
        rule = (f"tolerance {get_precision(precision).parity_tolerance:.0e}" if get_precision(precision).rewrite_kind is None
                else "see exporter.parity_ok: a share of the quantization error, and the same error vs the reference")
        raise TmpdiffError(
            f"{precision}: ONNX Runtime output differs from the torch model by {parity:.2e} ({rule}; error vs the "
            f"reference: ORT {error:.2e}, torch {torch_error:.2e})", path)
