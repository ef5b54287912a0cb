"""Quantization-aware MTEO (beyond the paper): each step of the student runs the modelopt fake-quant model of the
precision a schedule gives it, so the distilled embeddings also absorb that step's quantization error.

The fake-quant models are what `tmpdiff export` quantizes (same modelopt configs, layers kept high precision,
calibration on the model's own sampled trajectories); gradients pass their quantizers straight through (modelopt's
STE). modelopt's quantized attention ends in `FP8SDPA`, an autograd Function with no backward whose forward is
plain SDPA on the (already fake-quantized) q, k, v; `differentiable_attention` swaps it, for the duration of a
block, for that same SDPA call, so gradients pass and the forward values stay the same. The time embedders and
adaLN projections stay unquantized (HIGH_PRECISION_PATTERNS), so the embedding table the hooks replace is the same
in every precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from tmpdiff.export.calibration_data import CalibrationSet
from tmpdiff.export.quantize import build_config, quantize
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import SamplingInfo
from tmpdiff.formats.precisions import get_precision
from tmpdiff.models.adapter import DenoiserAdapter
from tmpdiff.models.dit import DiTAdapter
from tmpdiff.runtime.capture import sampled_calibration


def fake_quant_models(model: torch.nn.Module, sampling: SamplingInfo | None, precisions: Sequence[str],
                      seeds: Sequence[int] = (0,), steps: int = 10,
                      calibration: tuple[DenoiserAdapter, CalibrationSet] | None = None) -> dict[str, torch.nn.Module]:
    """One frozen modelopt fake-quant copy of `model` per quantized precision (fp32 is `model` itself), calibrated
    on the class-conditional model's own trajectories (`sampling`), or on a given adapter and calibration set (a
    pipeline's captured calls: `runtime.capture.prompted_calibration`)."""
    adapter = calibration[0] if calibration is not None else DiTAdapter(dict(model.config))
    models: dict[str, torch.nn.Module] = {}
    batches = None if calibration is None else calibration[1]
    for name in dict.fromkeys(precisions):
        if name == "fp32":
            models[name] = model
            continue
        spec = get_precision(name)
        if spec.modelopt_cfg is None:
            raise TmpdiffError(f"{name} is not a fake-quant precision: quantization-aware MTEO takes fp32, int8, fp8, "
                               f"int4")
        if batches is None:
            if sampling is None:
                raise TmpdiffError("fake-quant models need the class-conditional sampling info or a calibration set")
            batches = sampled_calibration(model, adapter, sampling, range(sampling.num_classes), list(seeds), steps)
        quantized = quantize(model, build_config(spec, model), batches.batches,
                             lambda m, batch: adapter.export_module(m)(*batch.values()))
        for p in quantized.parameters():
            p.requires_grad_(False)
        models[name] = quantized.eval()
    return models


def step_models(schedule: Sequence[str], models: dict[str, torch.nn.Module]) -> list[torch.nn.Module]:
    """The model each step runs, by the schedule's precision names."""
    missing = sorted(set(schedule) - set(models))
    if missing:
        raise TmpdiffError(f"schedule uses {', '.join(missing)}, not quantized")
    return [models[name] for name in schedule]


class _PlainSDPA:
    """Stands in for modelopt's FP8SDPA: its forward, i.e. the original SDPA (the scales it also takes are unused)."""

    @staticmethod
    def apply(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *_scales):
        from modelopt.torch.quantization.plugins.diffusion import diffusers as plugin

        return plugin.original_scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                            dropout_p=dropout_p, is_causal=is_causal, scale=scale)


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Inside the block, modelopt's quantized diffusers attention is differentiable (see the module docstring)."""
    from modelopt.torch.quantization.plugins.diffusion import diffusers as plugin

    original = plugin.FP8SDPA
    plugin.FP8SDPA = _PlainSDPA  # type: ignore[assignment]
    try:
        yield
    finally:
        plugin.FP8SDPA = original
