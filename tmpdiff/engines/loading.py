"""Opening built engines of a build directory for one backend and device."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tmpdiff.engines.base import Engine
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import Manifest, engine_key, engine_problem


def load_built_engines(build_dir: Path, manifest: Manifest, backend: str, device: str, needed: Iterable[str],
                       threads: int | None = None, what: str = "the schedule") -> dict[str, Engine]:
    """Every built engine of this backend and device, so a NaN step can fall back to a higher precision;
    the precisions `needed` (what a schedule names) must be among them."""
    built = manifest.built_precisions(backend, device)
    missing = sorted(set(needed) - set(built))
    if missing:
        raise TmpdiffError(f"{what} uses {', '.join(missing)} but only {', '.join(built) or 'no'} {backend} engines "
                           f"are built for {device}", build_dir)
    return load_engines(build_dir, manifest, backend, device, built, threads)


def load_engines(build_dir: Path, manifest: Manifest, backend: str, device: str, precisions: list[str],
                 threads: int | None = None) -> dict[str, Engine]:
    """One engine per precision, each checked against its manifest record (version, device, sha256).

    ORT engines share one memory arena, and in a tmpdiff process one thread pool (`share_runtime_resources`):
    the runtime runs them one at a time.
    """
    engines: dict[str, Engine] = {}
    if backend == "ort":
        from tmpdiff.engines.ort import share_runtime_resources

        share_runtime_resources(threads)
    for name in precisions:
        if name not in manifest.precisions:
            raise TmpdiffError(f"precision {name!r} was not exported (exported: {', '.join(manifest.precisions)})",
                               build_dir / "manifest.json")
        entry = manifest.engines.get(engine_key(backend, device, name))
        if entry is None:
            raise TmpdiffError(f"no {backend} engine for {name} on {device}: run `tmpdiff build {build_dir} --backend {backend}"
                               f" --device {device}`", build_dir / "manifest.json")
        problem = engine_problem(build_dir, manifest, entry)
        if problem is not None:
            raise TmpdiffError(f"the {backend} engine for {name}: {problem}; rebuild with "
                               f"`tmpdiff build {build_dir} --backend {backend}`", build_dir / entry.path)
        if backend == "ort":
            from tmpdiff.engines.ort_build import load_ort_engine

            engines[name] = load_ort_engine(build_dir, manifest, entry, device, threads)
        else:
            from tmpdiff.engines.trt import load_trt_engine

            engines[name] = load_trt_engine(
                build_dir, entry, input_specs=[s.spec() for s in manifest.inputs],
                output_specs=[s.spec() for s in manifest.outputs])
    return engines
