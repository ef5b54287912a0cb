"""`tmpdiff build`: turn every exported precision into an engine for one backend and device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tmpdiff.engines.ort_build import ort_engine_problem, prepare_ort_engine
from tmpdiff.formats.atomic import directory_lock
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import engine_key, engine_problem, load_manifest, save_manifest


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
) -> list[BuildOutcome]:
    """Build (ORT: optimise and save) each precision; engines already current for this backend/version/device are kept."""
    if backend not in ("ort", "trt"):
        raise TmpdiffError(f"unknown backend {backend!r}; choose ort or trt")
    load_manifest(build_dir)  # a wrong path fails here, before the lock file is created
    with directory_lock(build_dir):
        manifest = load_manifest(build_dir)
        names = precisions or list(manifest.precisions)
        unknown = [p for p in names if p not in manifest.precisions]
        if unknown:
            raise TmpdiffError(f"not exported: {', '.join(unknown)}; exported: {', '.join(manifest.precisions)}",
                               build_dir / "manifest.json")
        outcomes = []
        for name in names:
            entry = manifest.precisions[name]
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
            engine = prepare_ort_engine(build_dir, name, entry, device, threads)
            manifest.engines[key] = engine
            save_manifest(build_dir, manifest)
            outcomes.append(BuildOutcome(name, build_dir / engine.path, skipped=False))
        return outcomes


def _build_trt(build_dir: Path, manifest, name: str, current, options, on_progress):
    """Build one TensorRT plan from the precision's TensorRT graph; None if the current plan still fits."""
    from tmpdiff.engines.trt_build import TrtBuildOptions, build_trt_engine, load_tensorrt, options_profile

    options = options or TrtBuildOptions()
    entry = manifest.precisions[name]
    if entry.trt_onnx is None:
        raise TmpdiffError(f"{name} has no TensorRT graph; re-run `tmpdiff export`", build_dir / "manifest.json")
    trt = load_tensorrt()
    if current is not None and engine_problem(build_dir, manifest, current, backend_version=trt.__version__) is None:
        on_progress(f"{name}: up to date")
        return None
    on_progress(f"{name}: building TensorRT plan")
    specs = [s.spec() for s in manifest.inputs]
    return build_trt_engine(build_dir / entry.trt_onnx, build_dir / name, specs, options_profile(specs, options), options,
                            precision=name)


def trt_commands(build_dir: Path, precisions: list[str] | None, options) -> list[str]:
    """The trtexec and polygraphy commands that build the same plans on another machine (no TensorRT needed here)."""
    from tmpdiff.engines.trt_build import TrtBuildOptions, options_profile, polygraphy_command, trtexec_command

    options = options or TrtBuildOptions()
    manifest = load_manifest(build_dir)
    specs = [s.spec() for s in manifest.inputs]
    shapes = options_profile(specs, options)
    lines = []
    for name in precisions or list(manifest.precisions):
        entry = manifest.precisions[name]
        if entry.trt_onnx is None:
            continue
        onnx_path = build_dir / entry.trt_onnx
        plan = build_dir / name / "engine_trt.plan"
        lines += [f"# {name}", trtexec_command(onnx_path, plan, specs, shapes, options),
                  polygraphy_command(onnx_path, plan, specs, shapes, options)]
    return lines
