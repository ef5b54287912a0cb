"""Per-layer costs measured on the built ORT engines with ONNX Runtime's profiler (`enable_profiling`).

Each precision's engine (the optimised graph the runtime loads) runs `warmup + repeats` calls on the same inputs; the
profiler's per-node kernel times are attributed to the layer whose ONNX name scope the node carries (the exporter
names nodes after the module path, e.g. `/model/transformer_blocks.0/attn1/to_q/MatMul`, and ORT's fused nodes keep
it). A layer's cost is the sum over its nodes of each node's median time; nodes of no listed layer are `rest_ms`.
Profiling adds a little time per node; `step_ms` (the profiled whole call) is recorded to compare with `tmpdiff profile`.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from tmpdiff.engines.device import device_label
from tmpdiff.engines.loading import check_threads
from tmpdiff.engines.memory import check_fits
from tmpdiff.engines.ort import load_errors, session_options
from tmpdiff.engines.ort_build import ort_engine_problem, ort_version
from tmpdiff.engines.profile import make_buffers
from tmpdiff.formats.atomic import scratch_directory
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.layer_costs import LayerCost, LayerCostsTable
from tmpdiff.formats.manifest import engine_key, load_manifest


def layer_of(node: str, layers: Sequence[str]) -> str | None:
    """The layer (module path) whose scope a node name carries; the longest match wins, None for shared nodes."""
    dotted = "." + node.replace("/", ".") + "."
    best = None
    for layer in layers:
        if f".{layer}." in dotted and (best is None or len(layer) > len(best)):
            best = layer
    return best


def scope_owners(layers: Sequence[str]) -> Callable[[str], list[str]]:
    """An ORT node's owner: the one layer whose scope its name carries (none for shared nodes)."""
    def owners(node: str) -> list[str]:
        layer = layer_of(node, layers)
        return [] if layer is None else [layer]
    return owners


def attribute(times: Mapping[str, float], owners_of: Callable[[str], Sequence[str]], layers: Sequence[str],
              macs: Mapping[str, int]) -> tuple[dict[str, float], dict[str, int], float]:
    """Per layer the time of the profiled nodes it owns (ms) and how many it owns; the rest (ms). A node owned by
    several layers (a TensorRT layer fused from several modules) is split between them by their MACs."""
    per_layer, counts, rest = dict.fromkeys(layers, 0.0), dict.fromkeys(layers, 0), 0.0
    for node, ms in times.items():
        owners = list(dict.fromkeys(owners_of(node)))
        if not owners:
            rest += ms
            continue
        weights = [max(int(macs.get(owner, 0)), 0) for owner in owners]
        total = sum(weights)
        for owner, weight in zip(owners, weights, strict=True):
            per_layer[owner] += ms * (weight / total if total else 1 / len(owners))
            counts[owner] += 1
    return per_layer, counts, rest


def costs_table(build_dir: Path, manifest, layers: Sequence[str], macs: Mapping[str, int], names: Sequence[str],
                measured: Mapping[str, tuple[dict[str, float], dict[str, int], float, float]], *, backend: str,
                backend_version: str, device: str, batch: int, repeats: int, load: list[float],
                threads: int | None = None) -> LayerCostsTable:
    """The table from per precision (per-layer ms, node counts, rest ms, whole-call ms); every layer must own some
    profiled node at some precision (else the node names carry no module scopes)."""
    empty = [layer for layer in layers if not any(measured[p][1][layer] for p in names)]
    if empty:
        raise TmpdiffError(f"no profiled node belongs to layer {empty[0]} (node names do not carry module scopes)",
                           build_dir / "manifest.json")
    return LayerCostsTable(
        model_id=manifest.model_id, backend=backend, backend_version=backend_version, device=device, batch=batch,
        repeats=repeats, threads=threads, precisions=list(names), base=names[0] if "fp32" not in names else "fp32",
        layers=[LayerCost(name=layer, macs=int(macs.get(layer, 0)), ms={p: measured[p][0][layer] for p in names},
                          nodes={p: measured[p][1][layer] for p in names}) for layer in layers],
        rest_ms={p: measured[p][2] for p in names}, step_ms={p: measured[p][3] for p in names}, load_average=load)


def node_times(profile: list[dict], warmup: int) -> tuple[dict[str, list[float]], list[float]]:
    """Per node, its kernel times (ms) in the timed runs; and each timed run's whole duration (ms)."""
    runs = [e for e in profile if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes: dict[str, list[float]] = defaultdict(list)
    for event in profile:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            nodes[event["name"].removesuffix("_kernel_time")].append(event["dur"] / 1e3)
    timed = {name: times[warmup:] for name, times in nodes.items()}
    return {k: v for k, v in timed.items() if v}, [e["dur"] / 1e3 for e in runs[warmup:]]


def profile_engines(paths: Mapping[str, Path], feeds: Mapping[str, np.ndarray], warmup: int, repeats: int,
                    threads: int | None = None) -> dict[str, tuple[dict[str, float], float]]:
    """Per engine file: median kernel time per node (ms) and median whole-call time (ms) under ORT's profiler.

    The engines run interleaved (one call of each in every repeat), so drift in the machine's speed hits all alike.
    """
    import onnxruntime as ort

    with scratch_directory("ortprof") as tmp:
        sessions = {}
        for name, path in paths.items():
            opts = session_options(threads, optimization="disable")  # the prepared engine is already optimised
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / f"profile-{name}")
            opts.log_severity_level = 4  # a session that failed to load logs that it has no profile to write
            with load_errors(path):
                sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(warmup + repeats):
            for name, session in sessions.items():
                try:
                    session.run(None, dict(feeds))
                except Exception as exc:  # onnxruntime's own exception types (out of memory, a kernel's failure)
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise TmpdiffError(f"{name} engine failed to run ({first})", paths[name]) from None
        results = {}
        for name, session in sessions.items():
            nodes, runs = node_times(json.loads(Path(session.end_profiling()).read_text()), warmup)
            if not runs or not nodes:
                raise TmpdiffError("ONNX Runtime's profile holds no timed node events", paths[name])
            results[name] = ({node: statistics.median(times) for node, times in nodes.items()}, statistics.median(runs))
    return results


def profile_layers(build_dir: Path, layers: Sequence[str], macs: Mapping[str, int], precisions: Sequence[str] | None = None,
                   batch: int = 20, warmup: int = 3, repeats: int = 20, threads: int | None = None,
                   on_start: Callable[[list[str]], None] = lambda _: None) -> LayerCostsTable:
    """The per-layer costs table of `layers` on each precision's ORT-CPU engine of `build_dir` (`batch` rows a call)."""
    if repeats < 1 or warmup < 0:
        raise TmpdiffError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    check_threads(threads)
    manifest = load_manifest(build_dir)
    names = list(precisions or manifest.built_precisions("ort", "cpu"))
    check_fits(manifest, batch, "ort", "cpu")  # before the rows are made
    inputs, _ = make_buffers(manifest, batch, "cpu", build_dir)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    paths = {}
    for precision in names:
        entry = manifest.engines.get(engine_key("ort", "cpu", precision))
        if entry is None:
            raise TmpdiffError(f"no ORT-CPU engine for {precision}: run `tmpdiff build {build_dir}`",
                               build_dir / "manifest.json")
        problem = ort_engine_problem(build_dir, manifest, entry, "cpu")
        if problem is not None:
            raise TmpdiffError(f"{precision} engine {problem}: rebuild with `tmpdiff build {build_dir}`", build_dir / entry.path)
        paths[precision] = build_dir / entry.path
    on_start(names)
    load = [os.getloadavg()[0]]
    measured = {}
    for precision, (medians, step) in profile_engines(paths, feeds, warmup, repeats, threads).items():
        measured[precision] = (*attribute(medians, scope_owners(layers), layers, macs), step)
    return costs_table(build_dir, manifest, layers, macs, names, measured, backend="ort", backend_version=ort_version(),
                       device=device_label("cpu"), batch=batch, repeats=repeats, load=[*load, os.getloadavg()[0]],
                       threads=threads)
