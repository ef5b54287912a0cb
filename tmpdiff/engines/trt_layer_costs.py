"""Per-layer costs on TensorRT plans (GPU): TensorRT's per-layer profiler, attributed to the switchable layers.

Each precision's plan runs `warmup + repeats` calls (interleaved across precisions, CUDA graphs off) with an
`IProfiler` attached; every engine layer's median time goes to the switchable layers whose ONNX nodes it was built
from - named in the engine inspector's layer name and, from TensorRT's ONNX parser, its metadata - split by their MACs
when TensorRT fused several modules into one layer (a Myelin region spans whole attention blocks). Engine layers
built from no switchable module's nodes are `rest`. The attribution (`engine_layer_owners`) is plain data and is
tested on CPU; the profiling itself needs a GPU and TensorRT (never run here).
"""

from __future__ import annotations

import os
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tmpdiff.engines.layer_costs import attribute, costs_table, layer_of
from tmpdiff.engines.profile import make_buffers
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.layer_costs import LayerCostsTable
from tmpdiff.formats.manifest import engine_key, engine_problem, load_manifest

# ONNX node names inside an engine layer's name or metadata ("/model/blocks.0/attn1/to_q/MatMul + ...",
# "{ForeignNode[/model/a/Mul.../model/b/Add]}", "[ONNX Layer: /model/...]" joined by \x1f)
_NODE = re.compile(r"/[^\s\[\]{}+,\x1f]+")


def engine_layer_owners(layer_info: Sequence[Mapping], layers: Sequence[str]) -> dict[str, list[str]]:
    """Per engine layer name (as the profiler reports it), the switchable layers whose nodes it was built from."""
    owners = {}
    for info in layer_info:
        name = str(info.get("Name", ""))
        text = f"{name} {info.get('Metadata', '')}"
        found = [layer_of(node, layers) for node in _NODE.findall(text)]
        owners[name] = list(dict.fromkeys(layer for layer in found if layer is not None))
    return owners


def profile_trt_layers(build_dir: Path, layers: Sequence[str], macs: Mapping[str, int],
                       precisions: Sequence[str] | None = None, batch: int = 20, warmup: int = 3, repeats: int = 20,
                       on_start: Callable[[list[str]], None] = lambda _: None) -> LayerCostsTable:
    """The per-layer costs table of `layers` on each precision's TensorRT plan of `build_dir` (`batch` rows a call)."""
    import torch

    from tmpdiff.engines.device import device_label
    from tmpdiff.engines.streams import runtime_stream
    from tmpdiff.engines.trt import load_trt_engine
    from tmpdiff.engines.trt_build import load_tensorrt

    if repeats < 1 or warmup < 0:
        raise TmpdiffError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    trt = load_tensorrt()
    manifest = load_manifest(build_dir)
    names = list(precisions or manifest.built_precisions("trt", "cuda"))
    inputs, outputs = make_buffers(manifest, batch, "cuda", build_dir)
    specs = {"input_specs": [s.spec() for s in manifest.inputs], "output_specs": [s.spec() for s in manifest.outputs]}
    engines, profilers, owners = {}, {}, {}
    stream = runtime_stream("cuda")
    try:
        for precision in names:
            entry = manifest.engines.get(engine_key("trt", "cuda", precision))
            problem = "not built" if entry is None else engine_problem(build_dir, manifest, entry,
                                                                       backend_version=trt.__version__)
            if problem is not None:
                raise TmpdiffError(f"TensorRT plan for {precision}: {problem}; run `tmpdiff build {build_dir} "
                                   "--backend trt`", build_dir / "manifest.json")
            engine = engines[precision] = load_trt_engine(build_dir, entry, cuda_graph=False, **specs)
            engine.bind(inputs, outputs)
            owners[precision] = engine_layer_owners(engine.layer_information(), layers)
            profilers[precision] = _layer_profiler(trt)
            engine.set_profiler(profilers[precision])
        on_start(names)
        load = [os.getloadavg()[0]]
        calls: dict[str, list[float]] = defaultdict(list)
        for i in range(warmup + repeats):
            for precision, engine in engines.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream.torch)
                engine.run(stream)
                end.record(stream.torch)
                stream.synchronize()
                if i >= warmup:
                    calls[precision].append(start.elapsed_time(end))
                else:
                    profilers[precision].times.clear()
        measured = {}
        for precision in names:
            medians = {layer: statistics.median(t) for layer, t in profilers[precision].times.items() if t}
            table = owners[precision]
            measured[precision] = (*attribute(medians, lambda n, t=table: t.get(n, []), layers, macs),
                                   statistics.median(calls[precision]))
    finally:
        for engine in engines.values():
            engine.close()
    return costs_table(build_dir, manifest, layers, macs, names, measured, backend="trt", backend_version=trt.__version__,
                       device=device_label("cuda"), batch=batch, repeats=repeats, load=[*load, os.getloadavg()[0]])


def _layer_profiler(trt):
    """A `tensorrt.IProfiler` collecting each engine layer's times (ms) per run."""

    class LayerProfiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.times: dict[str, list[float]] = defaultdict(list)

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.times[layer_name].append(ms)

    return LayerProfiler()


