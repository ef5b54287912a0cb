"""fp16 convolutions on CPU computed in fp32 while a 16-bit model is traced and checked.

PyTorch's CPU kernels for fp16 convolutions are hundreds of times slower than fp32 on CPUs without native fp16
arithmetic (measured on this project's AMD EPYC, one thread, a 320 -> 320 3x3 convolution on 64 x 64: fp32 0.075 s,
fp16 36.8 s, bf16 0.034 s; fp16 Linear is 4.8x and attention 2x slower than fp32), so tracing a 16-bit UNet on CPU
and computing its parity reference takes hours. Inside `fp32_convolutions()` every fp16 CPU `Conv2d` computes in
fp32 and rounds its output to fp16 - what a GPU's fp16 convolution does, accumulating in fp32 - and traces as the same
single ONNX `Conv` on the fp16 tensors, so the exported graph is the one the plain trace writes.
`fp32_compute()` adds the same for fp16 `Linear` layers where nothing is traced (calibration, reference and parity
outputs): an int4 AWQ search runs 12 GEMMs per layer and batch, and sampled on an SD3-medium-size int4 export 93% of
its time was in fp16 `Linear.forward`. A Linear is not given a traceable form, so traces keep `fp32_convolutions()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def _conv_attributes(kernel: tuple[int, ...], stride, padding, dilation, groups: int) -> dict:
    return {"kernel_shape_i": list(kernel), "strides_i": list(stride), "pads_i": list(padding) * 2,
            "dilations_i": list(dilation), "group_i": groups}


class _HalfConv(torch.autograd.Function):
    """conv2d(x, weight, bias) computed in fp32, returned in x's dtype; exported as one ONNX Conv."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel, stride, padding, dilation, groups):  # noqa: ARG004
        return F.conv2d(x.float(), weight.float(), bias.float(), stride, padding, dilation, groups).to(x.dtype)

    @staticmethod
    def symbolic(g, x, weight, bias, kernel, stride, padding, dilation, groups):
        return g.op("Conv", x, weight, bias, **_conv_attributes(kernel, stride, padding, dilation, groups))


class _HalfConvNoBias(torch.autograd.Function):
    """`_HalfConv` for a convolution without bias."""

    @staticmethod
    def forward(ctx, x, weight, kernel, stride, padding, dilation, groups):  # noqa: ARG004
        return F.conv2d(x.float(), weight.float(), None, stride, padding, dilation, groups).to(x.dtype)

    @staticmethod
    def symbolic(g, x, weight, kernel, stride, padding, dilation, groups):
        return g.op("Conv", x, weight, **_conv_attributes(kernel, stride, padding, dilation, groups))


@contextlib.contextmanager
def fp32_convolutions() -> Iterator[None]:
    """Within the block, fp16 `Conv2d` calls on CPU (zero padding, numeric padding) compute in fp32; others as usual."""
    original = torch.nn.Conv2d._conv_forward

    def conv_forward(self: torch.nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if (x.dtype != torch.float16 or x.device.type != "cpu" or self.padding_mode != "zeros"
                or isinstance(self.padding, str)):
            return original(self, x, weight, bias)
        settings = (tuple(weight.shape[2:]), tuple(self.stride), tuple(self.padding), tuple(self.dilation), self.groups)
        if bias is None:
            return _HalfConvNoBias.apply(x, weight, *settings)
        return _HalfConv.apply(x, weight, bias, *settings)

    torch.nn.Conv2d._conv_forward = conv_forward
    try:
        yield
    finally:
        torch.nn.Conv2d._conv_forward = original


@contextlib.contextmanager
def fp32_compute() -> Iterator[None]:
    """`fp32_convolutions()`, and fp16 `Linear` calls on CPU computed in fp32 and rounded to fp16 (what a GPU's fp16
    GEMM does, accumulating in fp32). For forwards that are not traced: the Linear has no ONNX form here."""
    original = torch.nn.Linear.forward

    def linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight  # a quantized module hands out its fake-quantized weight here
        if x.dtype != torch.float16 or x.device.type != "cpu" or weight.dtype != torch.float16:
            return original(self, x)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), weight.float(), bias).to(x.dtype)

    torch.nn.Linear.forward = linear_forward
    try:
        with fp32_convolutions():
            yield
    finally:
        torch.nn.Linear.forward = original
