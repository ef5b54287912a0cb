"""Adapter for diffusers' `FluxTransformer2DModel` (FLUX.1 dev / schnell)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tmpdiff.formats.specs import TensorSpec
from tmpdiff.models.adapter import DenoiserAdapter, computing_in

_RMS_NORM_OPSET = 18  # ReduceMean takes axes as an input from opset 18; the registration covers later opsets


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """ONNX for aten::rms_norm (torch.nn.RMSNorm, Flux's q/k norm), which TorchScript export lacks below opset 23.

    Computed in float32 like torch does for half inputs: x / sqrt(mean(x^2) + eps), cast back, times weight.
    """
    from torch.onnx import symbolic_helper

    dims = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
    eps_value = torch.finfo(torch.float32).eps if symbolic_helper._is_none(eps) else symbolic_helper._get_const(eps, "f", "eps")
    axes = g.op("Constant", value_t=torch.tensor(list(range(-len(dims), 0)), dtype=torch.long))
    x32 = g.op("Cast", x, to_i=1)  # TensorProto.FLOAT
    mean_square = g.op("ReduceMean", g.op("Mul", x32, x32), axes, keepdims_i=1)
    rms = g.op("Sqrt", g.op("Add", mean_square, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))))
    out = g.op("CastLike", g.op("Div", x32, rms), x)
    return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)


def register_rms_norm_symbolic() -> None:
    """Teach the TorchScript ONNX exporter aten::rms_norm (idempotent, process-wide)."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, _RMS_NORM_OPSET)


@contextmanager
def traceable_unflatten() -> Iterator[None]:
    """Make `Tensor.unflatten` a reshape by traced sizes while this context is open.

    Under the TorchScript tracer (torch 2.13) an unflatten result's sizes are plain ints, so a later
    `x.reshape(*x.shape[:-1], -1, 2)` (diffusers' `apply_rotary_emb`, after Flux's `query.unflatten`)
    bakes the trace batch into the graph and ONNX Runtime fails at any other batch size.
    """
    original = torch.Tensor.unflatten

    def unflatten(self: torch.Tensor, dim: int, sizes) -> torch.Tensor:
        dim = dim % self.dim()
        return self.reshape(*self.shape[:dim], *sizes, *self.shape[dim + 1 :])

    torch.Tensor.unflatten = unflatten
    try:
        yield
    finally:
        torch.Tensor.unflatten = original


class _FluxForExport(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, guidance: bool) -> None:
        super().__init__()
        self.model = computing_in(model, dtype)
        self.dtype = dtype
        self.guidance = guidance

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                timestep: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor, *guidance: torch.Tensor) -> torch.Tensor:
        kwargs = {"encoder_hidden_states": encoder_hidden_states.to(self.dtype), "pooled_projections": pooled_projections.to(self.dtype),
                  "timestep": timestep, "img_ids": img_ids, "txt_ids": txt_ids, "guidance": guidance[0] if self.guidance else None}
        if torch.jit.is_tracing():
            with traceable_unflatten():
                return self.model(hidden_states.to(self.dtype), **kwargs, return_dict=False)[0].float()
        return self.model(hidden_states.to(self.dtype), **kwargs, return_dict=False)[0].float()


class FluxAdapter(DenoiserAdapter):
    """Inputs: packed latent (B, L, C) with L = (sample_size / 2)^2 tokens of 2x2 latent patches, T5 tokens
    (B, text_len, joint_attention_dim), pooled CLIP (B, pooled_projection_dim), timestep (B,) in [0, 1] (t / 1000),
    img_ids (L, 3) and txt_ids (text_len, 3) RoPE positions, and guidance (B,) when `guidance_embeds`. All float32.

    Config keys read besides diffusers': `sample_size` (latent height = width, default 128 = 1024 px) and
    `text_len` (default 512, FLUX.1-dev's T5 length).
    """

    default_text_len = 512
    architecture = "FluxTransformer2DModel"

    def latent_sides(self) -> list:
        return [self.config.get("sample_size", 128)]

    def side_multiple(self) -> int:
        return 2  # packed into 2x2 patches (the config's patch_size is the packed tokens', 1)

    @property
    def grid(self) -> int:
        """Side of the token grid: the latent is packed into 2x2 patches."""
        return int(self.config.get("sample_size", 128)) // 2

    @property
    def image_len(self) -> int:
        return self.grid * self.grid

    @property
    def has_guidance(self) -> bool:
        return bool(self.config.get("guidance_embeds", False))

    def input_specs(self) -> list[TensorSpec]:
        specs = [
            TensorSpec("hidden_states", "float32", ("batch", self.image_len, self.channels)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", self.text_len, int(self.config["joint_attention_dim"]))),
            TensorSpec("pooled_projections", "float32", ("batch", int(self.config["pooled_projection_dim"]))),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("img_ids", "float32", (self.image_len, 3)),
            TensorSpec("txt_ids", "float32", (self.text_len, 3)),
        ]
        if self.has_guidance:
            specs.append(TensorSpec("guidance", "float32", ("batch",)))
        return specs

    def output_specs(self) -> list[TensorSpec]:
        return [TensorSpec("noise_pred", "float32", ("batch", self.image_len, self.out_channels))]

    def export_module(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        register_rms_norm_symbolic()  # Flux's attention norms are torch.nn.RMSNorm
        return _FluxForExport(model, dtype, self.has_guidance).eval()

    def float_range(self, name: str) -> tuple[float, float] | None:
        if name == "timestep":
            return 0.0, 1.0
        if name == "guidance":
            return 1.0, 5.0  # the pipeline passes the guidance scale itself (FLUX.1-dev default 3.5)
        if name in ("img_ids", "txt_ids"):
            return 0.0, float(self.grid)  # (0, row, col) positions; the pipeline's txt_ids are zeros
        return None
