"""`tmpdiff run --pipeline DIR --prompt ...`: a local diffusers pipeline whose denoiser runs on the build's engines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tmpdiff.commands.run import RunOptions
from tmpdiff.formats.atomic import read_json_object
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.runtime.dropin import DENOISER_COMPONENTS, EngineDenoiser, attach_engines

DEFAULT_STEPS = 20  # for a uniform precision without --steps (the pipelines' own defaults range from 4 to 50)


@dataclass(kw_only=True)
class PromptRequest(RunOptions):
    """A text-conditioned run: the denoiser's engines inside a local diffusers pipeline."""

    pipeline_dir: Path
    prompts: list[str]
    height: int | None = None
    width: int | None = None


def load_pipeline_without_denoiser(pipeline_dir: Path):
    """The pipeline's text encoders, VAE and scheduler from a local directory (safetensors only, nothing downloaded)."""
    from diffusers import DiffusionPipeline

    index_path = pipeline_dir / "model_index.json"
    if not index_path.is_file():
        raise TmpdiffError("not a diffusers pipeline directory (no model_index.json)", pipeline_dir)
    components = read_json_object(index_path)
    denoiser = next((name for name in DENOISER_COMPONENTS if name in components), None)
    if denoiser is None:
        raise TmpdiffError(f"the pipeline has no {' or '.join(DENOISER_COMPONENTS)} component", index_path)
    try:
        return DiffusionPipeline.from_pretrained(pipeline_dir, **{denoiser: None}, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TmpdiffError(f"cannot load the pipeline ({first})", pipeline_dir) from None


def run_prompts(request: PromptRequest) -> tuple[np.ndarray, EngineDenoiser, str]:
    """Images (N, H, W, 3) uint8 for the prompts, the attached denoiser (its trace says what ran), and the schedule's source."""
    if not request.prompts or any(not p.strip() for p in request.prompts):
        raise TmpdiffError("every --prompt must be non-empty")
    plan = request.plan(DEFAULT_STEPS)
    pipe = load_pipeline_without_denoiser(request.pipeline_dir)
    denoiser = attach_engines(pipe, request.build_dir, schedule=plan, backend=request.backend, device=request.device,
                              threads=request.threads, nan_guard=request.nan_guard)
    if request.device != "cpu":
        pipe.to("cuda")
    kwargs = {"num_inference_steps": plan.steps, "generator": torch.Generator().manual_seed(request.seed), "output_type": "np"}
    if plan.timesteps is not None:  # attach_engines checked that the pipeline and its scheduler take them
        kwargs["timesteps"] = plan.timesteps
    if request.guidance_scale is not None:
        kwargs["guidance_scale"] = request.guidance_scale
    sample_size = denoiser.config.get("sample_size")
    scale = getattr(pipe, "vae_scale_factor", None)
    if sample_size and scale:  # the graphs' latent size is fixed: default to the image size it implies
        kwargs["height"] = request.height or int(sample_size) * scale
        kwargs["width"] = request.width or int(sample_size) * scale
    parameters = _call_parameters(pipe)
    if "use_resolution_binning" in parameters:
        kwargs["use_resolution_binning"] = False  # the graph's latent size is fixed: no aspect-ratio bins
    text_len = getattr(denoiser.adapter, "text_len", None)
    if text_len and "max_sequence_length" in parameters:
        kwargs["max_sequence_length"] = _t5_length(pipe, text_len)
    try:
        images = pipe(request.prompts, **kwargs).images
    except ValueError as exc:  # diffusers pipelines check their arguments with ValueError
        raise TmpdiffError(f"{type(pipe).__name__} refused the call ({exc})", request.pipeline_dir) from None
    finally:
        denoiser.close()
    return (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8), denoiser, plan.source


def _call_parameters(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


def _t5_length(pipe, text_len: int) -> int:
    """The pipeline's max_sequence_length that yields the exported text length (SD3 prepends its CLIP tokens)."""
    clip = getattr(pipe, "tokenizer", None)
    if type(pipe).__name__.startswith("StableDiffusion3") and clip is not None:
        return text_len - int(clip.model_max_length)
    return text_len
