"""Adapter for diffusers' `PixArtTransformer2DModel` (PixArt-alpha / PixArt-sigma)."""

from __future__ import annotations

import torch

from tmpdiff.formats.specs import TEXT_MASK, TensorSpec
from tmpdiff.models.adapter import DenoiserAdapter, computing_in


class _PixArtForExport(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, out_channels: int, tokens: int, dtype: torch.dtype, size_cond: bool) -> None:
        super().__init__()
        self.model = computing_in(model, dtype)
        self.out_channels = out_channels
        self.tokens = tokens
        self.dtype = dtype
        self.size_cond = size_cond

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                timestep: torch.Tensor, *size_cond: torch.Tensor) -> torch.Tensor:
        resolution, aspect_ratio = size_cond if self.size_cond else (None, None)
        hook = None
        if torch.jit.is_tracing():
            # PixArt squeezes proj_out's output at dim 1, the token axis: a no-op. Where the exporter's shape
            # inference has lost that axis' size (always behind fp8's TensorRT Q/DQ ops, which it cannot type),
            # TorchScript writes the squeeze as an If whose Squeeze branch ONNX Runtime rejects at load
            # ("Dimension of input 1 must be 1 instead of 16"). Handing the squeeze a (B, 1, tokens * C) view
            # makes it valid either way; PixArt's unpatchify reshape reads the same elements in the same order.
            batch, flat = hidden_states.shape[0], self.tokens * self.model.proj_out.out_features
            hook = self.model.proj_out.register_forward_hook(lambda module, args, output: output.reshape(batch, 1, flat))
        try:
            out = self.model(hidden_states.to(self.dtype), encoder_hidden_states=encoder_hidden_states.to(self.dtype),
                             encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                             added_cond_kwargs={"resolution": resolution, "aspect_ratio": aspect_ratio}, return_dict=False)[0]
        finally:
            if hook is not None:
                hook.remove()
        # A learned-sigma PixArt returns [eps, variance]; samplers here use eps only.
        return out[:, : self.out_channels].float()


class PixArtAdapter(DenoiserAdapter):
    """Inputs: latent (B, C, H, W), T5 tokens (B, text_len, caption_channels), their mask (B, text_len) with 1 for a
    token and 0 for padding (the pipeline pads every prompt to text_len), timestep (B,) in [0, 1000), and
    with additional conditions (PixArt-alpha 1024) resolution (B, 2) and aspect_ratio (B, 1). All float32.

    `text_len` (config key, default 300: PixArt-sigma; PixArt-alpha uses 120) fixes the text sequence length.
    """

    default_text_len = 300
    architecture = "PixArtTransformer2DModel"

    @property
    def text_dim(self) -> int:
        return int(self.config.get("caption_channels") or self.config["cross_attention_dim"])

    @property
    def size_conditioning(self) -> bool:
        """diffusers' rule: additional (resolution, aspect ratio) conditions unless configured, iff sample_size is 128."""
        flag = self.config.get("use_additional_conditions")
        return self.sample_size == 128 if flag is None else bool(flag)

    def input_specs(self) -> list[TensorSpec]:
        size = self.sample_size
        specs = [
            TensorSpec("hidden_states", "float32", ("batch", self.channels, size, size)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", self.text_len, self.text_dim)),
            TensorSpec(TEXT_MASK, "float32", ("batch", self.text_len)),
            TensorSpec("timestep", "float32", ("batch",)),
        ]
        if self.size_conditioning:
            specs += [TensorSpec("resolution", "float32", ("batch", 2)), TensorSpec("aspect_ratio", "float32", ("batch", 1))]
        return specs

    def output_specs(self) -> list[TensorSpec]:
        size = self.sample_size
        return [TensorSpec("noise_pred", "float32", ("batch", self.channels, size, size))]

    def export_module(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        tokens = (self.sample_size // int(self.config["patch_size"])) ** 2
        return _PixArtForExport(model, self.channels, tokens, dtype, self.size_conditioning).eval()

    def float_range(self, name: str) -> tuple[float, float] | None:
        if name == "timestep":
            return 0.0, 999.0
        if name == "resolution":
            return 256.0, 2048.0  # image height, width in pixels
        if name == "aspect_ratio":
            return 0.25, 4.0
        return None
