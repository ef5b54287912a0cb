"""Adapter for diffusers' `SD3Transformer2DModel` (Stable Diffusion 3 / 3.5 MMDiT)."""

from __future__ import annotations

import torch

from tmpdiff.formats.specs import TensorSpec
from tmpdiff.models.adapter import DenoiserAdapter, computing_in


class _SD3ForExport(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = computing_in(model, dtype)
        self.dtype = dtype

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                timestep: torch.Tensor) -> torch.Tensor:
        out = self.model(hidden_states.to(self.dtype), encoder_hidden_states=encoder_hidden_states.to(self.dtype),
                         pooled_projections=pooled_projections.to(self.dtype), timestep=timestep, return_dict=False)[0]
        return out.float()


class SD3Adapter(DenoiserAdapter):
    """Inputs: latent (B, C, H, W), text tokens (B, text_len, joint_attention_dim), pooled text
    (B, pooled_projection_dim), timestep (B,) in [0, 1000) (the pipeline passes sigma * 1000). All float32.

    `text_len` (config key, default 333: 77 CLIP + 256 T5 tokens) fixes the text sequence length.
    """

    default_text_len = 333
    architecture = "SD3Transformer2DModel"

    def input_specs(self) -> list[TensorSpec]:
        size = self.sample_size
        return [
            TensorSpec("hidden_states", "float32", ("batch", self.channels, size, size)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", self.text_len, int(self.config["joint_attention_dim"]))),
            TensorSpec("pooled_projections", "float32", ("batch", int(self.config["pooled_projection_dim"]))),
            TensorSpec("timestep", "float32", ("batch",)),
        ]

    def output_specs(self) -> list[TensorSpec]:
        size = self.sample_size
        return [TensorSpec("noise_pred", "float32", ("batch", self.out_channels, size, size))]

    def export_module(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return _SD3ForExport(model, dtype).eval()

    def float_range(self, name: str) -> tuple[float, float] | None:
        if name == "timestep":
            return 0.0, 999.0
        return None
