"""Preparing ORT engines: optimise each precision's graph once and save it beside the ONNX.

ORT's fully optimised graph can hold hardware-specific kernels (NCHWc layouts, MatMulNBits choices),
so the saved graph is tied to the device it was prepared on; the manifest records which.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tmpdiff.engines.device import device_label
from tmpdiff.engines.ort import OrtEngine
from tmpdiff.formats.atomic import TEMP_SUFFIX, sha256_file, temp_prefix
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import EngineEntry, Manifest, PrecisionEntry, engine_problem, verify_artifact


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def prepared_name(device: str) -> str:
    return f"model.ort-{device}.onnx"


def prepare_ort_engine(build_dir: Path, precision: str, entry: PrecisionEntry, device: str,
                       threads: int | None = None) -> EngineEntry:
    """Optimise `precision`'s ORT graph at its recorded level and save the result atomically."""
    source = verify_artifact(build_dir, precision, entry)
    rel = f"{precision}/{prepared_name(device)}"
    final = build_dir / rel
    with tempfile.TemporaryDirectory(prefix=temp_prefix(final.name), suffix=TEMP_SUFFIX, dir=final.parent) as tmp_dir:
        tmp = Path(tmp_dir) / final.name
        OrtEngine(source, precision, device, threads, entry.ort_optimization, optimized_path=tmp)
        if not tmp.is_file():
            raise TmpdiffError("ONNX Runtime did not write the optimised graph", final)
        os.replace(tmp, final)
    return EngineEntry(
        backend="ort", precision=precision, path=rel, sha256=sha256_file(final), source_sha256=entry.sha256,
        backend_version=ort_version(), device=device_label(device),
        build_flags={"optimization": entry.ort_optimization, "device": device,
                     "matmulnbits_accuracy_level": 1},
    )


def ort_engine_problem(build_dir: Path, manifest: Manifest, engine: EngineEntry, device: str) -> str | None:
    """Why a prepared engine does not fit this ORT version and device (None if it does)."""
    return engine_problem(build_dir, manifest, engine, backend_version=ort_version(), device=device_label(device))


def load_ort_engine(build_dir: Path, manifest: Manifest, engine: EngineEntry, device: str,
                    threads: int | None = None) -> OrtEngine:
    """Open a prepared engine after checking it is current for this export, ORT version and device."""
    problem = ort_engine_problem(build_dir, manifest, engine, device)
    if problem is not None:
        raise TmpdiffError(f"{engine.precision} engine {problem}: rebuild with `tmpdiff build {build_dir} --backend ort`",
                           build_dir / engine.path)
    # Already optimised at build time: skip re-optimisation on every load.
    return OrtEngine(build_dir / engine.path, engine.precision, device, threads, optimization="disable", runtime=True)
