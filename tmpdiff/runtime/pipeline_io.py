"""A local diffusers text-to-image pipeline as tmpdiff calls it: loading, the call's arguments, decoding latents.

One place, so that prompt capture (export), schedule calibration and `tmpdiff run --pipeline` sample the same way:
the graphs' fixed latent size and text length, no aspect-ratio bins, prompts passed as typed (no caption cleaning).
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Sequence
from pathlib import Path

import torch

from tmpdiff.formats.atomic import read_json_object
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.models.loading import variant_of, weights_variant
from tmpdiff.models.schedulers import inference_steps_for

DENOISER_COMPONENTS = ("transformer", "unet")


def is_pipeline_dir(path: Path) -> bool:
    """A diffusers pipeline directory (it has a model_index.json)."""
    return (path / "model_index.json").is_file()


def pipeline_scheduler_config(pipeline_dir: Path) -> Path:
    """The pipeline directory's scheduler config file (refused by name when missing)."""
    path = Path(pipeline_dir) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise TmpdiffError("not a diffusers pipeline directory with a scheduler (no scheduler/scheduler_config.json)",
                           pipeline_dir)
    return path


def pipeline_denoiser_name(pipeline_dir: Path) -> str:
    """Which component of a pipeline directory holds its denoiser (from model_index.json)."""
    index_path = pipeline_dir / "model_index.json"
    if not index_path.is_file():
        raise TmpdiffError("not a diffusers pipeline directory (no model_index.json)", pipeline_dir)
    components = read_json_object(index_path)
    name = next((n for n in DENOISER_COMPONENTS if n in components), None)
    if name is None:
        raise TmpdiffError(f"the pipeline has no {' or '.join(DENOISER_COMPONENTS)} component", index_path)
    return name


def pipeline_variant(pipeline_dir: Path, skipped: Collection[str] = ()) -> str | None:
    """The checkpoint variant a pipeline directory is loaded with (`from_pretrained(variant=...)`): None when each
    component it loads (`skipped`: those passed in instead) holds plain weights or none, else the one variant that the
    components holding only variant checkpoints carry (`save_pretrained(variant="fp16")`:
    `diffusion_pytorch_model.fp16.safetensors`, a text encoder's `model.fp16.safetensors`; `weights_variant`).
    diffusers gives that variant to each component that has its files and loads the others' plain weights. Refused
    by name: variants of different kinds (diffusers takes one for the whole pipeline), and plain weights beside the
    needed variant's files in one component (diffusers would load the variant there, not the plain weights)."""
    index = read_json_object(pipeline_dir / "model_index.json")
    folders = [pipeline_dir / name for name in sorted(index)
               if not name.startswith("_") and name not in skipped and (pipeline_dir / name).is_dir()]
    needed = {folder.name: variant for folder in folders if (variant := weights_variant(folder)) is not None}
    variants = sorted(set(needed.values()))
    if len(variants) > 1:
        listed = ", ".join(f"{name}: {variant}" for name, variant in needed.items())
        raise TmpdiffError(f"the pipeline's components hold only variant checkpoints of different kinds ({listed}); "
                           f"diffusers loads one variant for the whole pipeline: save them with one variant, or keep "
                           f"plain weights beside the others", pipeline_dir)
    if not variants:
        return None
    variant = variants[0]
    beside = [folder for folder in folders if folder.name not in needed
              and variant in {variant_of(path.name) for path in folder.glob("*.safetensors")}]
    if beside:
        raise TmpdiffError(f"holds plain weights beside {variant} ones, and {', '.join(needed)} only {variant} "
                           f"checkpoints: loaded with variant={variant!r}, diffusers would take the {variant} weights "
                           f"here, not the plain ones; keep one of the two", beside[0])
    return variant


def load_pipeline(pipeline_dir: Path, denoiser: torch.nn.Module | None = None, *, load_denoiser: bool = False):
    """The pipeline from a local directory (safetensors only, nothing downloaded): with `denoiser` given, that module
    as its denoiser; else its own denoiser when `load_denoiser`, none otherwise (engines will be attached).
    Components saved as a variant only load that variant (`pipeline_variant`)."""
    from diffusers import DiffusionPipeline

    pipeline_dir = Path(pipeline_dir)
    name = pipeline_denoiser_name(pipeline_dir)
    extra = {} if load_denoiser and denoiser is None else {name: denoiser}
    variant = pipeline_variant(pipeline_dir, skipped=extra)
    if variant is not None:
        extra["variant"] = variant
    try:
        pipe = DiffusionPipeline.from_pretrained(pipeline_dir, **extra, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TmpdiffError(f"cannot load the pipeline ({first})", pipeline_dir) from None
    pipe.set_progress_bar_config(disable=True)  # tmpdiff shows its own progress
    return pipe


def check_pipeline_denoiser(pipeline_dir: Path, model_sha256: str, manifest_path: Path) -> None:
    """The pipeline directory's denoiser must be the model the build was exported from (same config and weights)."""
    from tmpdiff.formats.manifest import recorded_model_hash

    denoiser_dir = pipeline_dir / pipeline_denoiser_name(pipeline_dir)
    if not (denoiser_dir / "config.json").is_file():
        raise TmpdiffError("the pipeline's denoiser has no config.json", denoiser_dir)
    if recorded_model_hash(denoiser_dir, model_sha256) != model_sha256:
        raise TmpdiffError(f"the pipeline's denoiser differs from the model the build was exported from (config or "
                           f"weights; the build's manifest is {manifest_path}): re-export from this pipeline or pass "
                           f"the pipeline it was exported from", denoiser_dir)


def call_parameters(pipe) -> set[str]:
    return set(inspect.signature(type(pipe).__call__).parameters)


def takes_class_labels(pipeline_class) -> bool:
    """Whether a pipeline class is conditioned on class labels (DiTPipeline) instead of prompts."""
    parameters = inspect.signature(pipeline_class.__call__).parameters
    return "class_labels" in parameters and "prompt" not in parameters


def pipeline_takes_class_labels(pipeline_dir: Path) -> bool:
    """Whether the pipeline directory's class (model_index.json) is conditioned on class labels; read without
    loading any model."""
    import diffusers

    name = read_json_object(Path(pipeline_dir) / "model_index.json").get("_class_name")
    cls = getattr(diffusers, str(name), None)
    return cls is not None and takes_class_labels(cls)


def conditioning_kwargs(pipe, conditions: Sequence[str] | Sequence[int], where: Path,
                        options: tuple[str, str] = ("--class", "--prompt"), num_classes: int | None = None) -> dict:
    """The call's conditioning argument: `prompt` for prompts (strs), `class_labels` for class labels (ints); refused
    by name when the pipeline takes the other kind (`options`: the command's options giving labels and prompts), or
    a label outside the denoiser's `num_classes` (its label table's null row included: the pipeline's to use)."""
    labelled = takes_class_labels(type(pipe))
    if all(isinstance(c, str) for c in conditions):
        if labelled:
            raise TmpdiffError(f"{type(pipe).__name__} takes class labels, not prompts: pass {options[0]}", where)
        return {"prompt": list(conditions)}
    if not labelled:
        raise TmpdiffError(f"{type(pipe).__name__} takes prompts, not class labels: pass {options[1]}", where)
    labels = [int(c) for c in conditions]
    outside = [label for label in labels if num_classes is not None and not 0 <= label < num_classes]
    if outside:
        raise TmpdiffError(f"{options[0]} {outside[0]} is outside the model's {num_classes} classes "
                           f"(0..{num_classes - 1})", where)
    return {"class_labels": labels}


class _DecodeReached(Exception):
    """Raised by the stand-in VAE decode of `final_latents`: it carries the latents the pipeline was decoding."""

    def __init__(self, latents: torch.Tensor) -> None:
        super().__init__("the pipeline reached its VAE decode")
        self.latents = latents


def final_latents(pipe, **call) -> torch.Tensor:
    """The final latents (float32, CPU) of one pipeline call: its `output_type="latent"` output, or, for a pipeline
    that decodes whatever output it is asked for (DiTPipeline), the latents it hands its VAE with the VAE's scaling
    undone, the decode itself skipped."""
    vae = pipe.vae

    def stop(latents: torch.Tensor, *args, **kwargs):
        raise _DecodeReached(latents)

    vae.decode = stop  # the instance attribute shadows the method; removed below
    try:
        output = pipe(output_type="latent", **call)
    except _DecodeReached as reached:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((reached.latents.float() - shift) * vae.config.scaling_factor).cpu()
    finally:
        del vae.decode
    return output.images.float().cpu()


def default_guidance_of(pipeline_class) -> float | None:
    """The guidance scale a pipeline class's call defaults to (None if it takes none)."""
    parameter = inspect.signature(pipeline_class.__call__).parameters.get("guidance_scale")
    return None if parameter is None or parameter.default is inspect.Parameter.empty else float(parameter.default)


def t5_length(pipe, text_len: int) -> int:
    """The pipeline's max_sequence_length that yields the exported text length (SD3 prepends its CLIP tokens)."""
    clip = getattr(pipe, "tokenizer", None)
    if type(pipe).__name__.startswith("StableDiffusion3") and clip is not None:
        return text_len - int(clip.model_max_length)
    return text_len


def call_kwargs(pipe, *, steps: int | None, seed: int, guidance_scale: float | None, text_len: int | None,
                sample_size: int | None, height: int | None = None, width: int | None = None) -> dict:
    """Keyword arguments of one pipeline call of `steps` denoiser calls at the graphs' sizes (`sample_size` latents,
    `text_len` tokens)."""
    parameters = call_parameters(pipe)
    kwargs: dict = {"generator": torch.Generator().manual_seed(seed)}
    if steps is not None:  # `steps` denoiser calls (a schedule's length); PNDM makes one more than it is asked
        kwargs["num_inference_steps"] = inference_steps_for(pipe.scheduler, steps)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    scale = getattr(pipe, "vae_scale_factor", None)
    if sample_size and scale and "height" in parameters:  # the graphs' latent size is fixed: the image size it implies
        kwargs["height"] = height or int(sample_size) * scale
        kwargs["width"] = width or int(sample_size) * scale
    if "use_resolution_binning" in parameters:
        kwargs["use_resolution_binning"] = False  # the graph's latent size is fixed: no aspect-ratio bins
    if "clean_caption" in parameters:
        kwargs["clean_caption"] = False  # prompts go in as typed (cleaning needs bs4 and ftfy)
    if text_len and "max_sequence_length" in parameters:
        kwargs["max_sequence_length"] = t5_length(pipe, text_len)
    return kwargs


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Final latents -> images (N, 3, H, W) in [0, 1], as the pipeline's own decode step makes them."""
    vae = pipe.vae
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    images = vae.decode(scaled, return_dict=False)[0]
    processor = getattr(pipe, "image_processor", None)
    if processor is None:  # DiTPipeline denormalises by hand, as the image processor does
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()
    return processor.postprocess(images, output_type="pt").float().cpu()
