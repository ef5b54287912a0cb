"""Adapter for diffusers' class-conditional `DiTTransformer2DModel`."""

from __future__ import annotations

import torch

from tmpdiff.formats.specs import TensorSpec
from tmpdiff.models.adapter import DenoiserAdapter, computing_in


class _DiTForExport(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, out_channels: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = computing_in(model, dtype)
        self.out_channels = out_channels
        self.dtype = dtype

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        out = self.model(hidden_states.to(self.dtype), timestep=timestep, class_labels=class_labels, return_dict=False)[0]
        # A learned-sigma DiT returns [eps, variance]; samplers here use eps only.
        return out[:, : self.out_channels].float()


class DiTAdapter(DenoiserAdapter):
    """Inputs: latent (B, C, H, W) float32, timestep (B,) float32, class id (B,) int64 (num_classes = null)."""

    architecture = "DiTTransformer2DModel"

    @property
    def channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def sample_size(self) -> int:
        # Spatial size is static: DiT's sin-cos position embedding is traced for sample_size.
        return int(self.config["sample_size"])

    @property
    def num_classes(self) -> int:
        return int(self.config["num_embeds_ada_norm"])

    def input_specs(self) -> list[TensorSpec]:
        c, size = self.channels, self.sample_size
        return [
            TensorSpec("hidden_states", "float32", ("batch", c, size, size)),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("class_labels", "int64", ("batch",)),
        ]

    def output_specs(self) -> list[TensorSpec]:
        size = self.sample_size
        return [TensorSpec("noise_pred", "float32", ("batch", self.channels, size, size))]

    def export_module(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return _DiTForExport(model, self.channels, dtype).eval()

    def integer_range(self, name: str) -> tuple[int, int]:
        if name == "class_labels":
            return 0, self.num_classes + 1  # includes the null (unconditional) class
        return super().integer_range(name)

    def float_range(self, name: str) -> tuple[float, float] | None:
        if name == "timestep":
            return 0.0, 999.0
        return None
