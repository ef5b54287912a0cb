"""fp16 convolutions on CPU computed in fp32 while exporting: same graph bytes, fp32-accumulated outputs, nothing
else touched, and a 16-bit UNet exported through it checks against its torch model."""

from __future__ import annotations

import contextlib

import onnx
import torch
import torch.nn.functional as F

from tmpdiff.export.half_convolutions import fp32_convolutions


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Conv2d(16, 8, 3, stride=2, padding=(0, 1), dilation=(1, 2)),
                               torch.nn.Conv2d(8, 4, 1, bias=False))


def _trace(module: torch.nn.Module, x: torch.Tensor, context, path) -> bytes:
    with context, torch.no_grad():
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=19, input_names=["x"],
                          output_names=["y"])
    return onnx.load(str(path)).SerializeToString()


def test_the_traced_graph_is_the_plain_traces_byte_for_byte(tmp_path):
    net, x = _net().half(), torch.randn(2, 8, 16, 16).half()
    plain = _trace(net, x, contextlib.nullcontext(), tmp_path / "plain.onnx")
    assert _trace(net, x, fp32_convolutions(), tmp_path / "fast.onnx") == plain


@torch.no_grad()
def test_fp16_convolutions_accumulate_in_fp32_and_nothing_else_changes():
    net, x = _net().half(), torch.randn(2, 8, 16, 16).half()
    original = torch.nn.Conv2d._conv_forward
    with fp32_convolutions():
        got = net(x)
        fp32_net = _net()
        fp32_out = fp32_net(x.float())
    want = x
    for layer in net:
        if isinstance(layer, torch.nn.Conv2d):
            want = F.conv2d(want.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float(),
                            layer.stride, layer.padding, layer.dilation, layer.groups).half()
        else:
            want = layer(want)
    assert torch.equal(got, want)
    assert torch.equal(fp32_out, _net()(x.float()))  # fp32 modules inside the block compute as outside it
    assert torch.nn.Conv2d._conv_forward is original  # restored after the block


def test_a_16_bit_unet_exports_and_checks_against_its_torch_model(tmp_path):
    from diffusers import UNet2DConditionModel

    from tmpdiff.export.exporter import export_model
    from tmpdiff.formats.manifest import load_manifest
    from tmpdiff.formats.precisions import get_precision

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                layers_per_block=1, attention_head_dim=8, norm_num_groups=8).half()
    unet.save_pretrained(tmp_path / "unet")
    build_dir, _ = export_model(tmp_path / "unet", tmp_path / "out", ["fp16"], model_id="unet16")
    entry = load_manifest(build_dir).precisions["fp16"]
    assert entry.parity_error < get_precision("fp16").parity_tolerance
    graph = onnx.load(str(build_dir / entry.onnx), load_external_data=False)
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    weights = {t.name: t.data_type for t in graph.graph.initializer}
    assert convs and all(weights.get(n.input[1]) == onnx.TensorProto.FLOAT16 for n in convs)


@torch.no_grad()
def test_fp16_linears_accumulate_in_fp32_inside_fp32_compute_and_fake_quant_weights_are_used():
    """Calibration forwards of a 16-bit model: fp16 Linear on CPU computes in fp32, rounds to fp16; a modelopt
    fake-quant Linear still multiplies by its quantized weight; fp32 layers and everything after the block unchanged."""
    import modelopt.torch.quantization as mtq

    from tmpdiff.export.half_convolutions import fp32_compute

    torch.manual_seed(0)
    linear, x = torch.nn.Linear(64, 32).half(), torch.randn(4, 64).half()
    want = F.linear(x.float(), linear.weight.float(), linear.bias.float()).half()
    original, conv_forward = torch.nn.Linear.forward, torch.nn.Conv2d._conv_forward
    with fp32_compute():
        got = linear(x)
        fp32_linear = torch.nn.Linear(64, 32)
        assert torch.equal(fp32_linear(x.float()), F.linear(x.float(), fp32_linear.weight, fp32_linear.bias))
        assert torch.nn.Conv2d._conv_forward is not conv_forward  # the convolutions' fp32 path is on too
    assert torch.equal(got, want) and torch.nn.Linear.forward is original and torch.nn.Conv2d._conv_forward is conv_forward
    config = {"quant_cfg": [{"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "axis": 0}},
                            {"quantizer_name": "*input_quantizer", "enable": False}], "algorithm": "max"}
    quantized = mtq.quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)).half(), config, lambda m: m(x))
    layer = quantized[0]
    fake_weight = layer.weight_quantizer(layer.weight)
    assert not torch.equal(fake_weight, layer.weight)  # 4 bits moved the weights
    with fp32_compute():
        got = quantized(x)
    assert torch.equal(got, F.linear(x.float(), fake_weight.float(), layer.bias.float()).half())
