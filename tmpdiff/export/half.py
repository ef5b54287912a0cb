"""TensorRT graphs on a 16-bit base: ModelOpt's AutoCast (`modelopt.onnx.autocast.convert_to_f16`, what ModelOpt's
diffusers example applies with `--trt-high-precision-dtype Half`) rewrites a quantized graph so every layer outside the
Q/DQ pairs computes in fp16 (attention, softmax, norms, unquantized GEMMs; Q/DQ scales in fp16), with fp32 graph
inputs and outputs kept by casts (or bf16: `--trt-dtype bfloat16`), and `fp32_nodes` (timestep sinusoids, RMS norms' mean
squares) kept in fp32 as diffusers computes them. A strongly typed TensorRT network then runs
those layers in 16 bits instead of FP32/TF32. The ORT-CPU twins stay fp32-based (this CPU has no fast fp16)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import onnx

from tmpdiff.formats.atomic import scratch_directory
from tmpdiff.formats.errors import TmpdiffError

# The 16-bit types a TensorRT graph can be based on -> AutoCast's name. fp16 by default, as ModelOpt's diffusers example
# and TensorRT's demo/Diffusion build; bf16 for models whose activations overflow fp16 (FLUX-size transformers).
TRT_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}


def preload_autocast() -> None:
    """Import AutoCast (and the native extensions modelopt.onnx loads) now. Interrupted by SIGTERM in the middle of
    that import, a nanobind module aborts the process instead of unwinding; export imports it before starting work."""
    import modelopt.onnx.autocast.convert  # noqa: F401


@contextlib.contextmanager
def _stable_subgraph_nodes() -> Iterator[None]:
    """Work around AutoCast 0.47 keying a subgraph's nodes by `id()` of protobuf wrappers it does not keep: a wrapper
    freed between its two loops comes back with another id (KeyError; seen on PixArt's fp8 graph, whose traced
    `squeeze` is an If). Holding every node of the subgraph while it converts keeps the ids stable."""
    from modelopt.onnx.autocast import precisionconverter

    converter = precisionconverter.PrecisionConverter
    original = getattr(converter, "_convert_subgraph_precision", None)
    if original is None:  # another modelopt: nothing to work around
        yield
        return

    def pinned(self, subgraph, *args, **kwargs):
        nodes = list(subgraph.node)  # noqa: F841 (alive for the call)
        return original(self, subgraph, *args, **kwargs)

    converter._convert_subgraph_precision = pinned
    try:
        yield
    finally:
        converter._convert_subgraph_precision = original


def _linear_dead_cast_cleanup(self) -> None:
    """AutoCast's `_cleanup_no_consumer_nodes` with one set of consumed names instead of a scan of every node per
    output (quadratic: 10 of the 23 s of the tiny PixArt's int8 export). Same nodes removed in the same order: the
    graph is not changed until the list is made."""
    outputs = {o.name for o in self.model.graph.output}
    consumed = {name for node in self.model.graph.node for name in node.input}
    dead = [node for node in self.model.graph.node if not any(out in outputs or out in consumed for out in node.output)]
    for node in dead:
        self.model.graph.node.remove(node)


@contextlib.contextmanager
def _linear_cleanup() -> Iterator[None]:
    """Use `_linear_dead_cast_cleanup` for the conversion (only on the AutoCast that has the quadratic method)."""
    from modelopt.onnx.autocast import precisionconverter

    converter = precisionconverter.PrecisionConverter
    original = getattr(converter, "_cleanup_no_consumer_nodes", None)
    if original is None:
        yield
        return
    converter._cleanup_no_consumer_nodes = _linear_dead_cast_cleanup
    try:
        yield
    finally:
        converter._cleanup_no_consumer_nodes = original


def _input_casts_in_input_order(model: onnx.ModelProto) -> onnx.ModelProto:
    """AutoCast puts the graph inputs' casts (and their value_info) first in the order of a set, so the same export
    wrote different bytes in different processes; put them in the graph's input order (they depend on nothing else)."""
    order = {i.name: n for n, i in enumerate(model.graph.input)}
    nodes = model.graph.node
    lead = 0
    while lead < len(nodes) and nodes[lead].op_type == "Cast" and nodes[lead].input[0] in order:
        lead += 1
    ordered = sorted((onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes[:lead]),
                     key=lambda n: (order[n.input[0]], n.output[0]))
    for index, node in enumerate(ordered):
        nodes[index].CopyFrom(node)
    # their outputs' value_info entries come in the same set order: the same slots, in the casts' order
    rank = {node.output[0]: n for n, node in enumerate(ordered)}
    infos = model.graph.value_info
    slots = [i for i, info in enumerate(infos) if info.name in rank]
    entries = sorted((onnx.ValueInfoProto.FromString(infos[i].SerializeToString()) for i in slots),
                     key=lambda info: rank[info.name])
    for index, info in zip(slots, entries, strict=True):
        infos[index].CopyFrom(info)
    return model


# Quantized weights (int8 / fp8 / int4 initializers read only by a DequantizeLinear) are what AutoCast never changes;
# it holds several working copies of the graph, so they sit out the conversion (most of a quantized graph's bytes).
_QUANTIZED_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                    onnx.TensorProto.FLOAT8E4M3FN}
HELD_NAME = "held_weights.bin"


@contextlib.contextmanager
def _quantized_weights_held(model: onnx.ModelProto) -> Iterator[Path]:
    """Within the block, `model`'s quantized weights (the dequantized input of a DequantizeLinear; AutoCast reads
    scales and zero points) are external data in a scratch file, so AutoCast's copies of the graph (and, for a graph
    over 2 GB, its checker's saved copy) leave them out. Yields the scratch directory `_restore` reads them from."""
    uses: dict[str, set[tuple[str, int]]] = {}  # name -> (op, input slot) of every reader
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, slot))
    with scratch_directory("autocast") as scratch:
        offset = 0
        with open(Path(scratch) / HELD_NAME, "wb") as data:
            for tensor in model.graph.initializer:
                if (tensor.data_type in _QUANTIZED_TYPES and tensor.HasField("raw_data")
                        and uses.get(tensor.name) == {("DequantizeLinear", 0)}):
                    data.write(tensor.raw_data)
                    size = len(tensor.raw_data)
                    tensor.ClearField("raw_data")
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", HELD_NAME), ("offset", str(offset)), ("length", str(size))):
                        tensor.external_data.add(key=key, value=value)
                    offset += size
        # ONNX's checker (AutoCast runs it first) resolves an in-memory graph's external data against the working
        # directory, and refuses locations outside it: the conversion runs from the scratch directory
        previous = os.getcwd()
        os.chdir(scratch)
        try:
            yield Path(scratch)
        finally:
            os.chdir(previous)


def _restore(model: onnx.ModelProto, scratch: Path) -> None:
    """Read the held weights back into the converted graph's initializers (same names, types and shapes)."""
    with open(scratch / HELD_NAME, "rb") as data:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            fields = {entry.key: entry.value for entry in tensor.external_data}
            if fields.get("location") != HELD_NAME:
                continue
            data.seek(int(fields["offset"]))
            tensor.raw_data = data.read(int(fields["length"]))
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")


# Op types a sinusoid's argument is computed with from the graph's inputs and constants: timestep / time id /
# guidance / RoPE position x frequencies (the frequencies themselves: Exp of a Range, or a folded constant).
_SINUSOID_ARGUMENT_OPS = {"Mul", "Div", "Add", "Sub", "Neg", "Exp", "Pow", "Range", "Unsqueeze", "Squeeze", "Reshape",
                          "Flatten", "Expand", "Tile", "Concat", "Slice", "Split", "Gather", "Transpose", "Identity",
                          "Cast", "CastLike", "Constant", "ConstantOfShape", "Where", "Einsum"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
# What `fp32_nodes` keeps: part of a precision's export key (another rule makes other TensorRT graphs)
FP32_KEPT = "sinusoids+rms-squares/1"


def _tensor_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types |= {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:  # Constant outputs carry their tensor's type
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


class _Graph:
    """A graph's producers, consumers, tensor types and initializers, for the walks of `fp32_nodes`."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.types = _tensor_types(graph)
        self.initializers = {t.name: t for t in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def is_float(self, name: str) -> bool:
        return self.types.get(name, onnx.TensorProto.UNDEFINED) in _FLOAT_TYPES

    def constant(self, name: str):
        """The value of an initializer or Constant output, else None."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            return numpy_helper.to_array(node.attribute[0].t)
        return None


def _sinusoid_nodes(graph: onnx.GraphProto, g: _Graph) -> set[str]:
    """Every Sin / Cos and the float nodes its argument is computed by from the graph's inputs and constants."""
    kept: set[str] = set()
    stack = []
    for node in graph.node:
        if node.op_type in ("Sin", "Cos"):
            kept.add(node.name)
            stack.extend(node.input)
    while stack:
        name = stack.pop()
        node = g.producers.get(name)
        if node is None or node.name in kept or node.op_type not in _SINUSOID_ARGUMENT_OPS or not g.is_float(name):
            continue
        kept.add(node.name)
        stack.extend(i for i in node.input if i)
    return kept


def _rms_square_nodes(graph: onnx.GraphProto, g: _Graph) -> set[str]:
    """Every RMS norm's mean square: x * x or x ^ 2 -> ReduceMean, then (+ eps, sqrt, reciprocal) up to the node that
    divides or multiplies x by it."""
    kept: set[str] = set()
    for node in graph.node:
        square = g.producers.get(node.input[0]) if node.op_type == "ReduceMean" and node.input else None
        if square is None:
            continue
        if square.op_type == "Mul" and len(square.input) == 2 and square.input[0] == square.input[1]:
            x = square.input[0]
        elif square.op_type == "Pow" and len(square.input) == 2:
            exponent = g.constant(square.input[1])
            if exponent is None or exponent.size != 1 or float(exponent.reshape(())) != 2.0:
                continue
            x = square.input[0]
        else:
            continue
        chain = [square, node]
        while True:
            following = g.consumers.get(chain[-1].output[0], [])
            if len(following) != 1 or following[0].op_type not in ("Add", "Sqrt", "Reciprocal", "Div", "Mul"):
                break
            chain.append(following[0])
            if following[0].op_type in ("Div", "Mul") and x in following[0].input:
                break
        kept.update(n.name for n in chain)
    return kept


def fp32_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes a 16-bit TensorRT graph keeps in fp32 (what diffusers computes in fp32 in a 16-bit model):
    every Sin / Cos and the float nodes its argument is computed by (timestep sinusoids: `time_proj`, SDXL's
    `add_time_proj` over the time ids, Flux's guidance, RoPE angles). In fp16, t ~ 1000 is rounded to 0.5 and the
    frequencies to 2^-11 relative: phase errors of ~0.3 rad, a sinusoid 7e-2 off (rel L2) at t = 999; and every RMS
    norm's mean square (Flux's, SD3.5's and Sana's q/k norms; torch computes it in fp32 for 16-bit inputs, Flux's
    rms_norm symbolic casts to fp32, a Cast AutoCast removes): in fp16, x * x overflows for |x| > 256. Their outputs
    are cast to 16 bits where 16-bit layers read them."""
    g = _Graph(model.graph)
    kept = _sinusoid_nodes(model.graph, g) | _rms_square_nodes(model.graph, g)
    kept.discard("")  # AutoCast classifies nodes by name: an unnamed node cannot be told apart
    return kept


@contextlib.contextmanager
def _fp32_kept() -> Iterator[None]:
    """AutoCast's conversion with `fp32_nodes` of the graph it converts (after its own sanitizing, whose opset
    conversion can rename nodes) in its high-precision list; `convert_to_f16` only blocks whole op types."""
    from modelopt.onnx.autocast import precisionconverter

    converter = precisionconverter.PrecisionConverter
    original = converter.convert

    def convert(self, high_precision_nodes, low_precision_nodes):
        kept = fp32_nodes(self.model)
        return original(self, [*high_precision_nodes, *(n for n in low_precision_nodes if n in kept)],
                        [n for n in low_precision_nodes if n not in kept])

    converter.convert = convert
    try:
        yield
    finally:
        converter.convert = original


def to_half(model: onnx.ModelProto, where: str, dtype: str = "float16") -> onnx.ModelProto:
    """The graph with `dtype` (float16 / bfloat16) compute and fp32 I/O; a TmpdiffError naming `where` if AutoCast
    refuses it. bf16 raises the graph's opset to 22 (AutoCast's requirement for bf16 Q/DQ scales)."""
    if dtype not in TRT_DTYPES:
        raise TmpdiffError(f"unknown 16-bit type {dtype!r} for the TensorRT graph (known: {', '.join(TRT_DTYPES)})", where)
    from modelopt.onnx.autocast.convert import convert_to_f16

    quiet = [logging.getLogger(name) for name in ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with (contextlib.redirect_stdout(io.StringIO()), _stable_subgraph_nodes(), _linear_cleanup(), _fp32_kept(),
              _quantized_weights_held(model) as held):
            converted = convert_to_f16(model, low_precision_type=TRT_DTYPES[dtype], keep_io_types=True)
            _restore(converted, held)
    except Exception as exc:  # AutoCast raises its own and onnx's error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TmpdiffError(f"ModelOpt AutoCast could not convert the TensorRT graph to {dtype} ({first})", where) from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return _input_casts_in_input_order(converted)
