"""Adapter for diffusers' `UNet2DConditionModel`: SD1.x/2.x cross-attention and SDXL added conditioning."""

from __future__ import annotations

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.specs import TensorSpec
from tmpdiff.models.adapter import DenoiserAdapter, computing_in

TIME_IDS = 6  # SDXL micro-conditioning: original size (2), crop top-left (2), target size (2)


class _UNetForExport(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, added_cond: bool) -> None:
        super().__init__()
        self.model = computing_in(model, dtype)
        self.dtype = dtype
        self.added_cond = added_cond

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *added: torch.Tensor) -> torch.Tensor:
        added_cond_kwargs = None
        if self.added_cond:
            text_embeds, time_ids = added
            added_cond_kwargs = {"text_embeds": text_embeds.to(self.dtype), "time_ids": time_ids}
        out = self.model(sample.to(self.dtype), timestep, encoder_hidden_states.to(self.dtype),
                         added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
        return out.float()


class UNetAdapter(DenoiserAdapter):
    """Inputs: sample (B, C, H, W), timestep (B,), encoder_hidden_states (B, text_len, cross_attention_dim);
    with `addition_embed_type="text_time"` (SDXL) also text_embeds (B, pooled dim) and time_ids (B, 6). All float32.

    `text_len` (config key, default 77: CLIP's context) fixes the text sequence length.
    """

    default_text_len = 77
    architecture = "UNet2DConditionModel"

    def latent_sides(self) -> list:
        size = self.config.get("sample_size")
        return list(size) if isinstance(size, list | tuple) and len(size) == 2 else [size]

    @property
    def latent_hw(self) -> tuple[int, int]:
        size = self.config["sample_size"]
        height, width = size if isinstance(size, list | tuple) else (size, size)
        return int(height), int(width)

    @property
    def text_dim(self) -> int:
        """Width of encoder_hidden_states: encoder_hid_dim when the UNet projects it, else cross_attention_dim."""
        dim = self.config.get("encoder_hid_dim") or self.config["cross_attention_dim"]
        return int(dim[0] if isinstance(dim, list | tuple) else dim)

    @property
    def sdxl(self) -> bool:
        """SDXL-style added conditioning (pooled text embeds + size/crop time ids)."""
        added = self.config.get("addition_embed_type")
        if added not in (None, "text_time") or self.config.get("class_embed_type") or self.config.get("num_class_embeds"):
            raise TmpdiffError(f"UNet2DConditionModel with addition_embed_type={added!r}, class_embed_type="
                               f"{self.config.get('class_embed_type')!r} is not supported (plain or SDXL text_time only)")
        return added == "text_time"

    @property
    def text_embeds_dim(self) -> int:
        return int(self.config["projection_class_embeddings_input_dim"]) - TIME_IDS * int(self.config["addition_time_embed_dim"])

    def input_specs(self) -> list[TensorSpec]:
        specs = [
            TensorSpec("sample", "float32", ("batch", self.channels, *self.latent_hw)),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", self.text_len, self.text_dim)),
        ]
        if self.sdxl:
            specs += [TensorSpec("text_embeds", "float32", ("batch", self.text_embeds_dim)),
                      TensorSpec("time_ids", "float32", ("batch", TIME_IDS))]
        return specs

    def output_specs(self) -> list[TensorSpec]:
        return [TensorSpec("noise_pred", "float32", ("batch", self.out_channels, *self.latent_hw))]

    def export_module(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return _UNetForExport(model, dtype, self.sdxl).eval()

    def float_range(self, name: str) -> tuple[float, float] | None:
        if name == "timestep":
            return 0.0, 999.0
        if name == "time_ids":
            return 0.0, 8.0 * max(self.latent_hw)  # pixel sizes and crop offsets
        return None
