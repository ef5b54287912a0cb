"""`tmpdiff build`: turn every exported precision into an engine for one backend and device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tmpdiff.atomic import directory_lock
from tmpdiff.engines.ort_build import ort_engine_current, prepare_ort_engine
from tmpdiff.errors import TmpdiffError
from tmpdiff.export.manifest import engine_key, load_manifest, save_manifest


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
) -> list[BuildOutcome]:
    """Build (ORT: optimise and save) each precision; engines already current for this backend/version/device are kept."""
    if backend != "ort":
        raise TmpdiffError(f"backend {backend!r} is built by its own module; this function builds ORT engines")
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
            if ort_engine_current(build_dir, current, entry, device):
                on_progress(f"{name}: up to date")
                outcomes.append(BuildOutcome(name, build_dir / current.path, skipped=True))
                continue
            on_progress(f"{name}: building")
            engine = prepare_ort_engine(build_dir, name, entry, device, threads)
            manifest.engines[key] = engine
            save_manifest(build_dir, manifest)
            outcomes.append(BuildOutcome(name, build_dir / engine.path, skipped=False))
        return outcomes
