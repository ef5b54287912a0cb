"""Adapter for diffusers' `SanaTransformer2DModel` (linear-attention DiT with GLUMBConv feed-forward)."""

from __future__ import annotations

import torch

from tmpdiff.formats.specs import TEXT_MASK, TensorSpec
from tmpdiff.models.adapter import DenoiserAdapter, computing_in


class _SanaForExport(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, guidance: bool) -> None:
        super().__init__()
        self.model = computing_in(model, dtype)
        self.dtype = dtype
        self.guidance = guidance

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                timestep: torch.Tensor, *guidance: torch.Tensor) -> torch.Tensor:
        out = self.model(hidden_states.to(self.dtype), encoder_hidden_states=encoder_hidden_states.to(self.dtype),
                         encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                         guidance=guidance[0] if self.guidance else None, return_dict=False)[0]
        return out.float()


class SanaAdapter(DenoiserAdapter):
    """Inputs: latent (B, C, H, W), Gemma tokens (B, text_len, caption_channels), their mask (B, text_len) with 1 for
    a token and 0 for padding, timestep (B,) in [0, 1000),
    and guidance (B,) when `guidance_embeds` (Sana Sprint). All float32.

    `text_len` (config key, default 300: the Sana pipeline's max_sequence_length) fixes the text sequence length.
    """

    default_text_len = 300
    architecture = "SanaTransformer2DModel"

    @property
    def has_guidance(self) -> bool:
        return bool(self.config.get("guidance_embeds", False))

    def input_specs(self) -> list[TensorSpec]:
        size = self.sample_size
        specs = [
            TensorSpec("hidden_states", "float32", ("batch", self.channels, size, size)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", self.text_len, int(self.config["caption_channels"]))),
            TensorSpec(TEXT_MASK, "float32", ("batch", self.text_len)),
            TensorSpec("timestep", "float32", ("batch",)),
        ]
        if self.has_guidance:
            specs.append(TensorSpec("guidance", "float32", ("batch",)))
        return specs

    def output_specs(self) -> list[TensorSpec]:
        size = self.sample_size
        return [TensorSpec("noise_pred", "float32", ("batch", self.out_channels, size, size))]

    def export_module(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return _SanaForExport(model, dtype, self.has_guidance).eval()

    def float_range(self, name: str) -> tuple[float, float] | None:
        if name == "timestep":
            return 0.0, 999.0
        if name == "guidance":
            return 1.0, 10.0
        return None
