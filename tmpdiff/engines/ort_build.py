"""Preparing ORT engines: optimise each precision's graph once and save it beside the ONNX.

ORT's fully optimised graph can hold hardware-specific kernels (NCHWc layouts, MatMulNBits choices),
so the saved graph is tied to the device it was prepared on; the manifest records which.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tmpdiff.atomic import TEMP_SUFFIX, sha256_file, temp_prefix
from tmpdiff.engines.device import device_label
from tmpdiff.engines.ort import OrtEngine
from tmpdiff.errors import TmpdiffError
from tmpdiff.export.manifest import EngineEntry, PrecisionEntry, verify_artifact


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


def ort_engine_current(build_dir: Path, engine: EngineEntry | None, entry: PrecisionEntry, device: str) -> bool:
    """True if a prepared engine exists for this graph, ORT version and device, and its file is intact."""
    if engine is None:
        return False
    path = build_dir / engine.path
    return (engine.source_sha256 == entry.sha256 and engine.backend_version == ort_version()
            and engine.device == device_label(device) and path.is_file() and sha256_file(path) == engine.sha256)


def load_ort_engine(build_dir: Path, engine: EngineEntry, device: str, threads: int | None = None) -> OrtEngine:
    """Open a prepared engine after checking it belongs to this ORT version and device."""
    path = build_dir / engine.path
    if engine.backend_version != ort_version():
        raise TmpdiffError(f"prepared with onnxruntime {engine.backend_version}, running {ort_version()}: "
                           "rebuild with `tmpdiff build --backend ort`", path)
    if engine.device != device_label(device):
        raise TmpdiffError(f"prepared for {engine.device!r}, this is {device_label(device)!r}: "
                           "rebuild with `tmpdiff build --backend ort`", path)
    if not path.is_file() or sha256_file(path) != engine.sha256:
        raise TmpdiffError("prepared engine is missing or does not match its sha256: rebuild with `tmpdiff build`", path)
    # Already optimised at build time: skip re-optimisation on every load.
    return OrtEngine(path, engine.precision, device, threads, optimization="disable", runtime=True)
