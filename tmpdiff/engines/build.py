"""`tmpdiff build`: turn every exported precision into an engine for one backend and device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tmpdiff.engines.ort_build import ort_engine_problem, prepare_ort_engine
from tmpdiff.formats.atomic import directory_lock
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import artifact_problem, engine_key, engine_problem, load_manifest, save_manifest


@dataclass
class BuildOutcome:
    precision: str
    path: Path
    skipped: bool


def build_engines(
    build_dir: Path,
    backend: str,
    device: str,
    precisions: list[str] | None = None,
    threads: int | None = None,
    on_progress: Callable[[str], None] = lambda _: None,
    trt_options=None,
    wait: float = 3600.0,
) -> list[BuildOutcome]:
    """Build (ORT: optimise and save) each precision; engines already current for this backend/version/device are kept."""
    if backend not in ("ort", "trt"):
        raise TmpdiffError(f"unknown backend {backend!r}; choose ort or trt")
    load_manifest(build_dir)  # a wrong path fails here, before the lock file is created
    with directory_lock(build_dir, wait, on_wait=on_progress):
        manifest = load_manifest(build_dir)
        names = list(precisions or manifest.precisions)
        # TensorRT also builds deployed layer configurations (`mixed-...`) by name; ORT runs their twins as deployed
        known = {*manifest.precisions, *(manifest.mixed if backend == "trt" else ())}
        unknown = [p for p in names if p not in known]
        if unknown:
            raise TmpdiffError(f"not exported: {', '.join(unknown)}; exported: {', '.join(manifest.precisions)}",
                               build_dir / "manifest.json")
        if backend == "trt" and precisions is None:  # TMPQ-DM layer configurations deployed with a TensorRT graph
            names += [name for name, entry in manifest.mixed.items() if entry.trt_onnx is not None]
        outcomes = []
        for name in names:
            key = engine_key(backend, device, name)
            current = manifest.engines.get(key)
            if backend == "trt":
                engine = _build_trt(build_dir, manifest, name, current, trt_options, on_progress)
                if engine is None:
                    outcomes.append(BuildOutcome(name, build_dir / current.path, skipped=True))
                    continue
                manifest.engines[key] = engine
                save_manifest(build_dir, manifest)
                outcomes.append(BuildOutcome(name, build_dir / engine.path, skipped=False))
                continue
            if current is not None and ort_engine_problem(build_dir, manifest, current, device) is None:
                on_progress(f"{name}: up to date")
                outcomes.append(BuildOutcome(name, build_dir / current.path, skipped=True))
                continue
            on_progress(f"{name}: building")
            engine = prepare_ort_engine(build_dir, name, manifest.precisions[name], device, threads)
            manifest.engines[key] = engine
            save_manifest(build_dir, manifest)
            outcomes.append(BuildOutcome(name, build_dir / engine.path, skipped=False))
        return outcomes


def _trt_plan_dir(build_dir: Path, name: str, trt_onnx: str) -> Path:
    """The folder a precision's plan is written into: its TensorRT graph's, which must lie inside the build directory
    (a manifest naming `../x/model.trt.onnx` would have the plan written outside it)."""
    graph = build_dir / trt_onnx
    if not graph.resolve().is_relative_to(build_dir.resolve()):
        raise TmpdiffError(f"{name}: its TensorRT graph {trt_onnx} is outside the build directory (a tampered "
                           "manifest?); re-run `tmpdiff export`", build_dir / "manifest.json")
    return graph.parent


def _build_trt(build_dir: Path, manifest, name: str, current, options, on_progress):
    """Build one TensorRT plan from the TensorRT graph of a precision (or of a deployed layer configuration, into
    its mixed/<name>/ directory); None if the current plan still fits."""
    from tmpdiff.engines.trt import gpu_mismatch
    from tmpdiff.engines.trt_build import TrtBuildOptions, build_trt_engine, cuda_device, load_tensorrt, options_profile

    options = options or TrtBuildOptions()
    mixed = manifest.mixed.get(name)
    entry = mixed or manifest.precisions[name]
    if entry.trt_onnx is None:
        raise TmpdiffError(f"{name} has no TensorRT graph; re-run `tmpdiff export`", build_dir / "manifest.json")
    trt = load_tensorrt()
    specs = [s.spec() for s in manifest.inputs]
    shapes = options_profile(specs, options)
    if current is not None and engine_problem(build_dir, manifest, current, backend_version=trt.__version__) is None:
        # what loading refuses (another GPU), or a plan built with other options than these: never "up to date"
        mismatch = gpu_mismatch(current, cuda_device()) or _options_mismatch(current, shapes, options)
        if mismatch is None:
            on_progress(f"{name}: up to date")
            return None
        on_progress(f"{name}: rebuilding ({mismatch})")
    for rel, digest in [(entry.trt_onnx, entry.trt_sha256),  # what is built is what the export recorded
                        *[(r, d) for r, d in getattr(entry, "artifacts", {}).items() if r == f"{entry.trt_onnx}.data"]]:
        path, problem = artifact_problem(build_dir, rel, digest)
        if problem is not None:
            raise TmpdiffError(f"{name}'s TensorRT graph: {problem}; re-run `tmpdiff export`", path)
    on_progress(f"{name}: building TensorRT plan")
    plan_dir = _trt_plan_dir(build_dir, name, entry.trt_onnx)
    built = build_trt_engine(build_dir / entry.trt_onnx, plan_dir, specs, shapes, options,
                             precision=name, build_dir=build_dir,
                             layer_precisions=None if mixed is None else mixed.precisions,
                             base=mixed.trt_base if mixed is not None else (entry.quantization or {}).get("trt_base"))
    built.source_sha256 = entry.source_sha256("trt") or built.source_sha256  # the graph and its data, as recorded
    return built


def _options_mismatch(current, shapes, options) -> str | None:
    """How a plan tmpdiff built differs from what these build options ask for (profile, level); None when it does
    not, or for an imported plan (built elsewhere: kept until the user imports or forces another)."""
    flags = current.build_flags
    if "profile" not in flags:
        return None
    wanted = {name: [list(s.min), list(s.opt), list(s.max)] for name, s in shapes.items()}
    if flags["profile"] != wanted:
        return f"built for shapes {_batches(flags['profile'])}, asked for {_batches(wanted)}"
    if flags.get("builder_optimization_level") != options.optimization_level:
        return (f"built at optimization level {flags.get('builder_optimization_level')}, asked for "
                f"{options.optimization_level}")
    if flags.get("tf32") is not False:  # plans built before TF32 was cleared: their fp32 GEMMs round to 10 bits
        return "built with TF32 on"
    return None


def _batches(profile: dict) -> str:
    """A profile's batch range, min..opt..max of the first input whose range is open (else of the first input with
    a first axis); one number when static."""
    ranges = [tuple(shape[0] for shape in shapes) for shapes in profile.values() if all(shapes)]
    if not ranges:
        return "static"
    low, opt, high = next((r for r in ranges if r[0] != r[2]), ranges[0])
    return f"batch {opt}" if low == opt == high else f"batch {low}..{opt}..{high}"


def import_trt_plan(build_dir: Path, precision: str, plan_file: Path, wait: float = 3600.0,
                    on_progress: Callable[[str], None] = lambda _: None) -> BuildOutcome:
    """Register a plan built elsewhere (trtexec, polygraphy) as this build's engine for `precision`.

    Checked like a plan tmpdiff built: TensorRT on this machine must deserialize it for this GPU, and its inputs and
    outputs must be the manifest's; it is then copied into the build dir under the name the runtime loads.
    """
    from tmpdiff.engines.trt import TrtEngine
    from tmpdiff.engines.trt_build import load_tensorrt, plan_file_name
    from tmpdiff.formats.atomic import sha256_file, write_bytes
    from tmpdiff.formats.manifest import EngineEntry

    plan_file = Path(plan_file)
    if not plan_file.is_file():
        raise TmpdiffError("plan file does not exist", plan_file)
    trt = load_tensorrt()
    with directory_lock(build_dir, wait, on_wait=on_progress):
        manifest = load_manifest(build_dir)
        entry = manifest.precisions.get(precision) or manifest.mixed.get(precision)  # a precision or a `mixed-...`
        if entry is None or entry.trt_onnx is None:
            raise TmpdiffError(f"{precision} has no exported TensorRT graph here", build_dir / "manifest.json")
        engine = TrtEngine(plan_file, precision=precision, input_specs=[s.spec() for s in manifest.inputs],
                           output_specs=[s.spec() for s in manifest.outputs])  # deserializes and checks the I/O
        gpu = engine.gpu
        engine.close()
        rel = f"{_trt_plan_dir(build_dir, precision, entry.trt_onnx).relative_to(build_dir).as_posix()}/" \
              f"{plan_file_name(trt.__version__)}"
        write_bytes(build_dir / rel, plan_file.read_bytes())
        manifest.engines[engine_key("trt", "cuda", precision)] = EngineEntry(
            backend="trt", precision=precision, path=rel, sha256=sha256_file(build_dir / rel),
            source_sha256=entry.source_sha256("trt") or "", backend_version=trt.__version__, device="cuda",
            compute_capability=gpu.compute_capability, build_flags={"imported_from": str(plan_file), "gpu_name": gpu.name})
        save_manifest(build_dir, manifest)
    return BuildOutcome(precision, build_dir / rel, skipped=False)


def trt_commands(build_dir: Path, precisions: list[str] | None, options) -> list[str]:
    """The trtexec and polygraphy commands that build the same plans on another machine (no TensorRT needed here)."""
    from tmpdiff.engines.trt_build import TrtBuildOptions, options_profile, polygraphy_command, trtexec_command

    options = options or TrtBuildOptions()
    manifest = load_manifest(build_dir)
    specs = [s.spec() for s in manifest.inputs]
    shapes = options_profile(specs, options)
    lines = []
    for name in precisions or [*manifest.precisions, *manifest.mixed]:
        entry = manifest.precisions.get(name) or manifest.mixed[name]
        if entry.trt_onnx is None:
            continue
        onnx_path = build_dir / entry.trt_onnx
        plan = onnx_path.parent / "external.plan"
        lines += [f"# {name}: build with either command, then register the plan (checked like a plan tmpdiff builds):",
                  trtexec_command(onnx_path, plan, specs, shapes, options),
                  polygraphy_command(onnx_path, plan, specs, shapes, options),
                  f"tmpdiff build {build_dir} --backend trt --import-plan {name}={plan}"]
    return lines
