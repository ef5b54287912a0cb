"""What the 16-bit TensorRT graphs (`export.half.to_half`, ModelOpt's AutoCast) keep in fp32: the timestep / time-id /
guidance / RoPE sinusoids and RMS norms' mean squares (diffusers computes them in fp32 in a 16-bit model), read off the
written graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import shape_inference

from tests.test_architectures import CASES
from tmpdiff.export.half import to_half
from tmpdiff.export.onnx_export import load_weights, traced
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.models.registry import adapter_for_config

FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _types(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    inferred = shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types |= {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            types[node.output[0]] = node.attribute[0].t.data_type
    return inferred, types


def sinusoid_paths(model: onnx.ModelProto) -> tuple[list[tuple[str, int]], set[str], int]:
    """(float tensors not in fp32 on any float path from a graph input or constant to a Sin / Cos output, the graph
    inputs those paths start at, how many Sin / Cos there are)."""
    inferred, types = _types(model)
    producers = {out: node for node in inferred.graph.node for out in node.output}
    inputs = {i.name for i in inferred.graph.input}
    sinusoids = [n for n in inferred.graph.node if n.op_type in ("Sin", "Cos")]
    stack = [name for node in sinusoids for name in (*node.input, *node.output)]
    seen, wrong, reached = set(), [], set()
    while stack:
        name = stack.pop()
        if name in seen or types.get(name) not in FLOATS:
            continue
        seen.add(name)
        if types[name] != onnx.TensorProto.FLOAT:
            wrong.append((name, types[name]))
        if name in inputs:
            reached.add(name)
        if name in producers:
            stack.extend(i for i in producers[name].input if i)
    return wrong, reached, len(sinusoids)


def _tiny(name: str):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().eval()
    if case.config:
        model.register_to_config(**case.config)
    return model, adapter_for_config(dict(model.config) | {"_class_name": type(model).__name__})


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# the graph inputs a family's sinusoids are computed from
SINUSOID_INPUTS = {"unet-sdxl": {"timestep", "time_ids"}, "sd3": {"timestep"},
                   "pixart": {"timestep", "resolution", "aspect_ratio"},
                   "flux": {"timestep", "guidance", "img_ids", "txt_ids"}}


@pytest.mark.parametrize("name", list(SINUSOID_INPUTS))
def test_sinusoids_stay_fp32_in_the_16_bit_graph(name):
    """From each timestep-like input to every Sin / Cos output no tensor is fp16 (before: the timestep was cast to
    fp16 first, so t = 999.3 became 999.5 and the frequencies lost 2^-11: phase errors of ~0.3 rad), and the 16-bit
    graph is closer to the fp32 one at t = 999.3 on ONNX Runtime (before: 4.6e-3 SD3, 6.9e-3 Flux, 7.7e-3 SDXL's
    UNet, 1.5e-2 PixArt; now 3.4e-4 to 7.2e-4)."""
    import onnxruntime

    model, adapter = _tiny(name)
    with traced(adapter.export_module(model), adapter, 19) as (proto, data_dir):
        load_weights(proto, data_dir)
        fp32 = proto.SerializeToString()
        half = to_half(proto, name)
    wrong, reached, count = sinusoid_paths(half)
    assert count > 0 and reached == SINUSOID_INPUTS[name], (count, reached)
    assert wrong == [], wrong[:5]

    inputs = adapter.sample_inputs(adapter.default_dims(2), seed=1)
    inputs["timestep"] = torch.full_like(inputs["timestep"], 0.9993 if name == "flux" else 999.3)  # Flux: t / 1000
    feeds = {k: v.numpy() for k, v in inputs.items()}
    cpu = ["CPUExecutionProvider"]
    want = onnxruntime.InferenceSession(fp32, providers=cpu).run(None, feeds)[0]
    got = onnxruntime.InferenceSession(half.SerializeToString(), providers=cpu).run(None, feeds)[0]
    assert _relative(got, want) < 2e-3, _relative(got, want)


def test_the_bundled_dits_timestep_sinusoid_stays_fp32(fp32_build):
    """The bundled DiT's fp32 graph converted as its quantized TensorRT graphs are: `time_proj` in fp32."""
    source = onnx.load(str(fp32_build / load_manifest(fp32_build).precisions["fp32"].onnx))
    wrong, reached, count = sinusoid_paths(to_half(source, "bundled"))
    assert count > 0 and reached == {"timestep"} and wrong == [], (count, reached, wrong[:5])


def test_input_casts_in_input_order():
    """AutoCast's casts of the graph inputs (and their value_info) come first in a set's order: `to_half` puts them in
    the graph's input order."""
    from onnx import TensorProto, helper

    from tmpdiff.export.half import _input_casts_in_input_order

    names = ["a", "b", "c"]
    casts = [helper.make_node("Cast", [n], [f"{n}16"], to=TensorProto.FLOAT16, name=f"cast_{n}") for n in ("c", "a", "b")]
    add = helper.make_node("Sum", [f"{n}16" for n in names], ["y"], name="sum")
    graph = helper.make_graph([*casts, add], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in names],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])],
                              value_info=[helper.make_tensor_value_info(f"{n}16", TensorProto.FLOAT16, [2])
                                          for n in ("b", "c", "a")])
    ordered = _input_casts_in_input_order(helper.make_model(graph))
    assert [n.input[0] for n in ordered.graph.node[:3]] == names and ordered.graph.node[3].op_type == "Sum"
    assert [v.name for v in ordered.graph.value_info] == ["a16", "b16", "c16"]


@pytest.mark.parametrize("name", ["flux", "sd3", "sana"])
def test_rms_norms_square_and_average_in_fp32(name):
    """Flux's, SD3.5's (qk_norm="rms_norm") and Sana's RMS norms: in the 16-bit graph every x * x / x ^ 2 and the
    ReduceMean over it read fp32 (before: fp16, which overflows for |x| > 256 where TensorRT computes in fp16; Flux's
    own symbolic computes in fp32 but AutoCast removed its Cast)."""
    model, adapter = _tiny(name)
    with traced(adapter.export_module(model), adapter, 19) as (proto, data_dir):
        load_weights(proto, data_dir)
        half = to_half(proto, name)
    inferred, types = _types(half)
    producers = {out: node for node in inferred.graph.node for out in node.output}
    means = [n for n in inferred.graph.node if n.op_type == "ReduceMean"]
    squares = [producers[n.input[0]] for n in means]
    assert means and all(s.op_type in ("Mul", "Pow") for s in squares), [s.op_type for s in squares]
    read = [(n.name, types[n.input[0]]) for n in [*means, *squares]]
    assert all(t == onnx.TensorProto.FLOAT for _, t in read), read
