"""Opening built engines of a build directory for one backend and device."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tmpdiff.engines.base import Engine
from tmpdiff.formats.atomic import lock_holder
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import EngineEntry, Manifest, engine_key, engine_problem, mixed_problem

BACKEND_DEVICES = {"ort": ("cpu", "cuda", "trt-ep"), "trt": ("cuda",)}


def check_backend(backend: str, device: str) -> None:
    """A known backend and a device it runs on."""
    if backend not in BACKEND_DEVICES:
        raise TmpdiffError(f"unknown backend {backend!r}; choose {' or '.join(BACKEND_DEVICES)}")
    if device not in BACKEND_DEVICES[backend]:
        raise TmpdiffError(f"unknown device {device!r} for {backend}; choose {', '.join(BACKEND_DEVICES[backend])}")


def resolve_device(backend: str, device: str | None) -> str:
    """The one rule for every command and the library: TensorRT runs on CUDA; ORT on the device asked for, else the
    CPU. A TensorRT run asked for another device, or an unknown backend or device, is refused."""
    if backend == "trt" and device not in (None, "cuda"):
        raise TmpdiffError(f"--backend trt runs on cuda, not --device {device}")
    device = device or ("cuda" if backend == "trt" else "cpu")
    check_backend(backend, device)
    return device


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or `taskset`'s share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on this platform
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> None:
    """At most one intra-op thread per usable core: more only time-slice the same cores."""
    cores = usable_cores()
    if threads is not None and not 1 <= threads <= cores:
        raise TmpdiffError(f"--threads must be in 1..{cores} (the cores this process may use), got {threads}")


def check_batch(manifest: Manifest, build_dir: Path, backend: str, device: str, rows: int) -> None:
    """A run's batch rows must fit every TensorRT plan's optimisation profile (checked before any work)."""
    if backend != "trt":
        return
    for entry in manifest.engines.values():
        if entry.backend != "trt":
            continue
        profile = entry.build_flags.get("profile") or {}
        ranges = [(shape[0][0], shape[2][0]) for shape in profile.values() if shape and shape[0]]
        if ranges and not all(low <= rows <= high for low, high in ranges):
            low, high = ranges[0]
            built = f"batch {low}" if low == high else f"batches {low}..{high}"
            raise TmpdiffError(f"this run needs {rows} batch rows (samples x 2 with guidance), the {entry.precision} plan was "
                               f"built for {built}: rebuild with `tmpdiff build {build_dir} --backend trt --batch {rows}` "
                               f"(or --dynamic --max-batch {rows})", build_dir / entry.path)


def load_built_engines(build_dir: Path, manifest: Manifest, backend: str, device: str, needed: Iterable[str],
                       threads: int | None = None, what: str = "the schedule") -> dict[str, Engine]:
    """Every built engine of this backend and device, so a NaN step can fall back to a higher precision;
    the precisions `needed` (what a schedule names) must be among them."""
    built = manifest.built_precisions(backend, device)
    missing = sorted(set(needed) - set(built))
    if missing and not built:
        raise TmpdiffError(f"no {backend} engine is built for {device}: run `tmpdiff build {build_dir} --backend {backend}"
                           + ("" if backend == "trt" else f" --device {device}") + "`", build_dir)
    if missing:
        raise TmpdiffError(f"{what} uses {', '.join(missing)} but only {', '.join(built)} {backend} engines "
                           f"are built for {device}", build_dir)
    return load_engines(build_dir, manifest, backend, device, built, threads)


def load_plan_engines(build_dir: Path, manifest: Manifest, backend: str, device: str, needed: Iterable[str],
                      threads: int | None = None, what: str = "the schedule") -> dict[str, Engine]:
    """`load_built_engines` for the precisions a plan names, plus the deployed layer configurations (`mixed-...`) of
    a TMPQ-DM plan, each checked against its manifest record first: on ONNX Runtime its twin (optimised at load), on
    TensorRT the plan `tmpdiff build --backend trt` built from its TensorRT graph."""
    needed = list(needed)
    mixed = [name for name in needed if name.startswith("mixed-")]
    for name in mixed:
        problem = mixed_problem(build_dir, manifest, name, backend)
        if problem is not None:
            raise TmpdiffError(f"{what} runs layer configuration {name}: {problem}; run `tmpdiff deploy-plan "
                               f"{build_dir} PLAN`", build_dir / "manifest.json")
    engines = load_built_engines(build_dir, manifest, backend, device, [n for n in needed if n not in mixed],
                                 threads, what)
    for name in mixed:
        if backend == "trt":
            engines[name] = _load_trt(build_dir, manifest, _current_engine(build_dir, manifest, backend, device, name))
            continue
        from tmpdiff.engines.ort import OrtEngine

        entry = manifest.mixed[name]
        engines[name] = OrtEngine(build_dir / entry.onnx, name, device, threads, optimization=entry.ort_optimization,
                                  runtime=True)
    return engines


def _current_engine(build_dir: Path, manifest: Manifest, backend: str, device: str, name: str) -> EngineEntry:
    """The manifest's engine for `name` on this backend and device, refused (naming the fix) when missing or stale."""
    entry = manifest.engines.get(engine_key(backend, device, name))
    if entry is None:
        raise TmpdiffError(f"no {backend} engine for {name} on {device}: run `tmpdiff build {build_dir} --backend {backend}"
                           f" --device {device}`", build_dir / "manifest.json")
    problem = engine_problem(build_dir, manifest, entry)
    if problem is not None:
        raise TmpdiffError(f"the {backend} engine for {name}: {problem}; rebuild with "
                           f"`tmpdiff build {build_dir} --backend {backend}`", build_dir / entry.path)
    return entry


def _load_trt(build_dir: Path, manifest: Manifest, entry: EngineEntry, cuda_graphs: bool = True) -> Engine:
    from tmpdiff.engines.trt import load_trt_engine

    # CUDA graphs by default: a graph bakes in shapes and addresses, so each bind (a new batch size or buffers) drops
    # it and the first run after it captures a new one (dynamic plans included, as TensorRT's diffusion demo does)
    return load_trt_engine(build_dir, entry, input_specs=[s.spec() for s in manifest.inputs],
                           output_specs=[s.spec() for s in manifest.outputs], cuda_graph=cuda_graphs)


def load_engines(build_dir: Path, manifest: Manifest, backend: str, device: str, precisions: list[str],
                 threads: int | None = None, cuda_graphs: bool = True) -> dict[str, Engine]:
    """One engine per precision, each checked against its manifest record (version, device, sha256).

    ORT engines share one memory arena, and in a tmpdiff process one thread pool (`share_runtime_resources`):
    the runtime runs them one at a time.
    """
    holder = lock_holder(build_dir)
    if holder is not None:
        raise TmpdiffError(f"a tmpdiff export or build (PID {holder if holder > 0 else '?'}) is writing this build "
                           "directory; run again when it has finished", build_dir)
    engines: dict[str, Engine] = {}
    if backend == "ort":
        from tmpdiff.engines.ort import share_runtime_resources

        share_runtime_resources(threads)
    try:
        for name in precisions:
            if name not in manifest.precisions:
                raise TmpdiffError(f"precision {name!r} was not exported (exported: {', '.join(manifest.precisions)})",
                                   build_dir / "manifest.json")
            entry = _current_engine(build_dir, manifest, backend, device, name)
            if backend == "ort":
                from tmpdiff.engines.ort_build import load_ort_engine

                engines[name] = load_ort_engine(build_dir, manifest, entry, device, threads)
            else:
                engines[name] = _load_trt(build_dir, manifest, entry, cuda_graphs)
    except BaseException:  # those loaded before the one that failed are nobody's: freed (a TensorRT plan's memory)
        for engine in engines.values():
            engine.close()
        raise
    return engines
