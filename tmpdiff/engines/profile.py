"""`tmpdiff profile`: median step latency of every built precision, measured interleaved in one process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from tmpdiff.engines.base import Engine
from tmpdiff.engines.device import device_label
from tmpdiff.engines.loading import load_engines
from tmpdiff.engines.memory import check_fits
from tmpdiff.engines.streams import runtime_stream
from tmpdiff.formats.costs import CostsTable, PrecisionCost
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import engine_key, load_manifest
from tmpdiff.models.registry import adapter_for_config
from tmpdiff.models.time_embedding_input import adapter_for_build


def make_buffers(manifest, batch: int, device: str, build_dir: Path | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Runtime-style buffers for the model's inputs (random, valid values) and outputs (zeros); `build_dir` is
    needed for graphs that take a time-embeddings input (their rows come from the build's table)."""
    if manifest.time_embedding_input is not None:
        if build_dir is None:
            raise TmpdiffError("graphs with a time-embeddings input need their build directory for buffers")
        adapter = adapter_for_build(build_dir, manifest)
    else:
        adapter = adapter_for_config(manifest.denoiser_config)
    dims = adapter.default_dims(batch)
    torch_device = "cuda" if device in ("cuda", "trt-ep", "trt") else "cpu"
    inputs = {k: v.to(torch_device).contiguous() for k, v in adapter.sample_inputs(dims, seed=0).items()}
    outputs = {s.name: torch.zeros(s.concrete(dims), dtype=getattr(torch, s.dtype), device=torch_device)
               for s in adapter.output_specs()}
    return inputs, outputs


def time_engines(engines: dict[str, Engine], stream, warmup: int, repeats: int,
                 on_repeat: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per run of each engine; precisions interleaved in every repeat so drift hits all alike."""
    for engine in engines.values():
        for _ in range(warmup):
            engine.run(stream)
        stream.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.run(stream)
            stream.synchronize()
            samples[name].append(time.perf_counter() - start)
        on_repeat()
    return samples


def profile_build(build_dir: Path, backend: str, device: str, batch: int, warmup: int = 3, repeats: int = 20,
                  threads: int | None = None, precisions: list[str] | None = None,
                  on_repeat: Callable[[], None] = lambda: None) -> CostsTable:
    """Measure every built engine of `build_dir` at `batch` and return the costs table."""
    if repeats < 1:
        raise TmpdiffError(f"--repeats must be >= 1, got {repeats}")
    manifest = load_manifest(build_dir)
    names = precisions or manifest.built_precisions(backend, device)
    if not names:
        where = f" --device {device}" if backend == "ort" and device != "cpu" else ""
        raise TmpdiffError(f"no {backend} engines built for {device}: run `tmpdiff build {build_dir} --backend {backend}"
                           f"{where}`", build_dir / "manifest.json")
    engines = load_engines(build_dir, manifest, backend, device, names, threads)
    check_fits(manifest, batch, backend, device)
    inputs, outputs = make_buffers(manifest, batch, device, build_dir)
    for engine in engines.values():
        engine.bind(inputs, outputs)
    samples = time_engines(engines, runtime_stream(device), warmup, repeats, on_repeat)
    for engine in engines.values():
        engine.close()
    costs = {}
    for name, seconds in samples.items():
        ms = np.array(seconds) * 1e3
        costs[name] = PrecisionCost(median_ms=float(statistics.median(ms)), p10_ms=float(np.percentile(ms, 10)),
                                    p90_ms=float(np.percentile(ms, 90)), repeats=repeats)
    version = manifest.engines[engine_key(backend, device, names[0])].backend_version
    return CostsTable(model_id=manifest.model_id, backend=backend, backend_version=version, device=device_label(device),
                      batch=batch, threads=threads or _shared_pool_threads(backend), warmup=warmup,
                      measured_at=datetime.now(UTC).isoformat(timespec="seconds"), precisions=costs)


def _shared_pool_threads(backend: str) -> int | None:
    """The size of ONNX Runtime's process-wide thread pool the engines ran on, when one was set up (a CLI process:
    every core this process may use), else None (each session's own default)."""
    if backend != "ort":
        return None
    from tmpdiff.engines.ort import process_state

    return process_state.get("threads")
