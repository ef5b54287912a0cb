"""Memory as a measured quantity: bytes per batch row of each built engine, and a guard that refuses a run whose
batch cannot fit before anything is allocated.

The per-row figure is measured when an ORT-CPU engine is built: a fresh process (onnxruntime only) runs the prepared
graph at two batch sizes with the runtime's session options, and the growth of its resident memory (ORT's arena keeps what a
run needed) divided by the added rows is recorded. Without a measurement (older builds, GPU engines) the guard falls back to the lower bound
from ONNX shape inference at export (I/O plus twice the largest activation per row).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import Manifest

ROWS = (4, 36)  # the two batch sizes measured; the difference is what one row costs
LARGE_ROWS = (1, 3)  # for graphs over LARGE_GRAPH_BYTES (an SD1.5 UNet row takes seconds and ~0.5 GB on CPU)
LARGE_GRAPH_BYTES = 256 * 2**20
# ORT's CPU arena extends by powers of two, so a run can hold up to twice what it uses (seen on the bundled model:
# 0.74 MiB per row measured here, 1.6 MiB per row of peak RSS growth between --batch 250 and 1000 of `tmpdiff run`)
ARENA_GROWTH = 2

_PROBE = r"""
import json, resource, sys
import numpy as np, onnxruntime as ort
path, optimization, inputs, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
options = ort.SessionOptions()
options.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}.get(
    optimization, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
peaks = []
for n in rows:
    feeds = {}
    for name, dtype, shape in inputs:
        shape = [n if isinstance(d, str) else d for d in shape]
        feeds[name] = (np.ones(shape, dtype) if "int" not in dtype else np.zeros(shape, dtype))
    session.run(None, feeds)
    with open("/proc/self/statm") as fh:  # resident pages now: ORT's arena keeps what the run needed
        peaks.append(int(fh.read().split()[1]) * resource.getpagesize())
print(json.dumps(peaks))
"""


def measure_bytes_per_row(onnx_path: Path, input_specs: list, optimization: str = "disable") -> int | None:
    """Resident-memory growth per batch row of a graph on ORT-CPU (None if the probe process fails). Large graphs
    (weights beside them included) are probed at smaller batches, so the probe stays minutes and gigabytes below
    the build it belongs to."""
    specs = [[s.name, s.dtype, list(s.shape)] for s in input_specs]
    data = onnx_path.with_name(f"{onnx_path.name}.data")
    size = onnx_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    rows = LARGE_ROWS if size > LARGE_GRAPH_BYTES else ROWS
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, str(onnx_path), optimization, json.dumps(specs),
                               json.dumps(list(rows))], capture_output=True, text=True, timeout=1800, check=True)
        low, high = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None
    return max(0, (high - low) // (rows[1] - rows[0]))


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where the OS does not say)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def bytes_per_row(manifest: Manifest, backend: str = "ort", device: str = "cpu") -> tuple[int, str]:
    """What one batch row needs and where the figure comes from: the largest measured engine of this backend and
    device, else the shape-inference lower bound."""
    measured = [e.build_flags.get("bytes_per_row") for e in manifest.engines.values()
                if e.backend == backend and e.build_flags.get("device", "cuda") == device]
    measured = [m for m in measured if isinstance(m, int) and m > 0]
    if measured:
        return ARENA_GROWTH * max(measured), f"measured at build, x{ARENA_GROWTH} for arena growth"
    io = 0
    for spec in [*manifest.inputs, *manifest.outputs]:
        size = 1
        for dim in spec.shape[1:]:
            size *= dim if isinstance(dim, int) else 1
        io += size * (8 if spec.dtype in ("int64", "float64") else 4)
    return io + 2 * (manifest.activation_bytes_per_row or 0), "lower bound from the graph"


def free_gpu_bytes() -> int | None:
    """Free memory of the current CUDA device (None without one)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return int(free)


def check_fits(manifest: Manifest, rows: int, backend: str = "ort", device: str = "cpu", what: str = "--batch",
               held_rows: int = 0) -> None:
    """Raise before allocation when `rows` batch rows need more than the memory available now: host memory for
    ORT-CPU, the GPU's free memory for TensorRT and ORT's CUDA / TensorRT providers (their rows live there). A process
    already holding `held_rows` (its engines' arenas keep their peak) needs memory for the rows beyond them only."""
    per_row, source = bytes_per_row(manifest, backend, device)
    on_gpu = backend == "trt" or device != "cpu"
    available = free_gpu_bytes() if on_gpu else available_bytes()
    need = (rows - held_rows) * per_row
    if available is not None and need > available:
        where = "free on the GPU" if on_gpu else "available"
        more = f" more than the {held_rows} rows already held" if held_rows else ""
        raise TmpdiffError(f"{rows} batch rows need about {need / 2**30:.1f} GiB{more} ({per_row / 2**20:.2f} MiB per "
                           f"row, {source}), {available / 2**30:.2f} GiB is {where}: use a smaller {what}")


def release_freed_memory() -> None:
    """Free unreachable objects and hand memory the process has freed back to the system (glibc's `malloc_trim`; the
    trim is a no-op elsewhere).

    glibc keeps freed heap for reuse, so after a multi-gigabyte graph is dropped the resident size stays at its peak and
    the next stage's allocations stack on top of it; trimming after each large graph is freed lets stages reuse the
    same physical memory (measured on an export's stages: see `export.memory_plan`)."""
    import ctypes
    import ctypes.util

    gc.collect()  # a quantized torch module is held in reference cycles (its quantizers' hooks), not by refcounts alone
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return
    trim(0)


_frozen_lock = threading.Lock()
_frozen_depth = 0


@contextmanager
def collecting_new_objects_only() -> Iterator[None]:
    """Leave the objects that exist on entry out of every garbage collection until exit (`gc.freeze`), so each
    `release_freed_memory` scans only what was made since: with torch, diffusers and modelopt imported a full
    collection walks ~570k objects (0.3 s each time, measured on an AMD EPYC), six times per quantized export, while
    what a stage frees (a model, a graph) was always made inside. Objects made before entry that become garbage inside
    are collected after exit. Nested or concurrent uses unfreeze once, when the last one leaves."""
    global _frozen_depth
    with _frozen_lock:
        if _frozen_depth == 0:
            gc.freeze()
        _frozen_depth += 1
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_depth -= 1
            if _frozen_depth == 0:
                gc.unfreeze()
