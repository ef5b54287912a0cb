"""`tmpdiff info`: what a build directory holds — model, exported precisions, engines and whether each is current."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tmpdiff.engines.ort_build import engine_state
from tmpdiff.formats.manifest import load_manifest, mixed_problem, precision_problems


def build_info(build_dir: Path) -> dict[str, Any]:
    """The manifest's content as a user reads it, with each artifact's state checked on disk (hashes included)."""
    manifest = load_manifest(build_dir)
    precisions = {}
    root = build_dir.resolve()
    for name, entry in manifest.precisions.items():
        problems = precision_problems(build_dir, entry)
        # a file outside the build dir is a problem (shown in state), not part of the build's size
        held = [path for path in ((root / rel).resolve() for rel, _ in entry.files())
                if path.is_relative_to(root) and path.is_file()]
        size = sum(path.stat().st_size for path in held)
        precisions[name] = {"files": len(entry.files()), "bytes": size, "error_vs_fp32": entry.error_vs_fp32,
                            "state": "; ".join(p for _, p in problems) or "ok"}
    engines = {key: {"backend": e.backend, "precision": e.precision, "backend_version": e.backend_version,
                     "device": e.device, "compute_capability": e.compute_capability,
                     "state": engine_state(build_dir, manifest, e) or "ok",
                     "version_and_device_checked": e.backend == "ort"}  # TensorRT's: where TensorRT runs
               for key, e in manifest.engines.items()}
    mixed = {name: {"layers": dict(Counter(e.precisions)), "parity_error": e.parity_error,
                    "state": mixed_problem(build_dir, manifest, name) or "ok"} for name, e in manifest.mixed.items()}
    entry = manifest.time_embedding_input
    embeddings = None if entry is None else {"slots": len(entry.slots), "dim": entry.dim,
                                             "train_timesteps": entry.train_timesteps}
    return {"build_dir": str(build_dir), "format": manifest.format, "model_id": manifest.model_id,
            "architecture": manifest.architecture, "inputs": [s.model_dump() for s in manifest.inputs],
            "sampling": None if manifest.sampling is None else manifest.sampling.scheduler_class,
            "precisions": precisions, "engines": engines, "mixed": mixed, "time_embedding_input": embeddings}
