"""`tmpdiff distill-embeddings`: MTEO time embeddings (or timestep shifts) for an N-step solver, to a safetensors file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tmpdiff.calibration.few_step import ClassConditioning, PromptConditioning
from tmpdiff.calibration.mteo import DistillConfig, Distiller, DistillResult, embeddings_info
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import model_content_hash
from tmpdiff.formats.outputs import Output, check_outputs
from tmpdiff.formats.time_embeddings import TimeEmbeddingsInfo
from tmpdiff.models.time_embeddings import save_time_embeddings


@dataclass
class DistillOutcome:
    info: TimeEmbeddingsInfo
    path: Path
    results: dict[str, DistillResult]


def load_distiller(model: str, *, prompts: list[str] | None = None, guidance_scale: float | None = None,
                   max_sequence_length: int | None = None) -> tuple[Distiller, Path]:
    """The frozen denoiser and its conditioning: a bundled-style class-conditional model directory ('bundled': the
    bundled DiT), or a diffusers text-to-image pipeline directory ('bundled-t2i': the bundled one) with its prompts
    encoded once by its own text encoder; and the denoiser's directory (its transformer)."""
    from tmpdiff.runtime.pipeline_io import is_pipeline_dir

    if model == "bundled-t2i" or (model != "bundled" and is_pipeline_dir(Path(model))):
        return load_pipeline_distiller(model, prompts, guidance_scale, max_sequence_length)
    if prompts is not None or max_sequence_length is not None:
        raise TmpdiffError("--prompts and --max-sequence-length are for text-to-image pipelines; "
                           f"{model} is class-conditional")
    from tmpdiff.models.bundled import load_model_info, sampling_info
    from tmpdiff.models.loading import load_diffusers_model

    info = load_model_info(model)
    sampling = sampling_info(info)
    net = load_diffusers_model(info.root, "transformer")
    scale = sampling.guidance_scale if guidance_scale is None else guidance_scale
    distiller = Distiller(net, dict(sampling.scheduler_config), scale,
                          ClassConditioning(sampling.num_classes, sampling.null_class), sampling.channels,
                          sampling.image_size)
    return distiller, info.root / "transformer"


def bundled_t2i_prompts(seed: int = 0) -> list[str]:
    """The bundled text-to-image model's 270 held-in prompts in a seeded order (held-out ones stay for evaluation)."""
    from tmpdiff.models.colored_digits import held_in_combos

    combos = held_in_combos()
    order = torch.randperm(len(combos), generator=torch.Generator().manual_seed(seed)).tolist()
    return [combos[i].prompt for i in order]


@torch.no_grad()
def load_pipeline_distiller(model: str, prompts: list[str] | None, guidance_scale: float | None,
                            max_sequence_length: int | None) -> tuple[Distiller, Path]:
    """A text-to-image pipeline's frozen denoiser, with `prompts` (and the empty negative prompt) encoded once."""
    from tmpdiff.runtime.pipeline_io import call_parameters, default_guidance_of, load_pipeline

    if model == "bundled-t2i":
        from tmpdiff.models.tiny_t2i import TEXT_LEN, t2i_dir

        root = t2i_dir()
        prompts = bundled_t2i_prompts() if prompts is None else prompts
        max_sequence_length = TEXT_LEN if max_sequence_length is None else max_sequence_length
    else:
        root = Path(model)
        if prompts is None:
            raise TmpdiffError("a pipeline distils on prompts: give --prompts FILE (one per line)", root)
    if not prompts or any(not p.strip() for p in prompts):
        raise TmpdiffError("the prompts are empty (or one of them is)")
    pipe = load_pipeline(root, load_denoiser=True)
    if not hasattr(pipe, "transformer") or not hasattr(pipe, "encode_prompt"):
        raise TmpdiffError(f"{type(pipe).__name__} is not supported for distillation: it needs a transformer "
                           "denoiser with adaLN time conditioning and the pipeline's encode_prompt", root)
    scale = guidance_scale if guidance_scale is not None else default_guidance_of(type(pipe))
    if scale is None:
        raise TmpdiffError(f"{type(pipe).__name__} takes no guidance scale", root)
    length = {} if max_sequence_length is None or "max_sequence_length" not in call_parameters(pipe) \
        else {"max_sequence_length": max_sequence_length}
    embeds, mask, negative, negative_mask = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=True,
                                                               negative_prompt="", device="cpu", **length)
    net = pipe.transformer
    conditioning = PromptConditioning(embeds.float(), mask, negative[0].float(), negative_mask[0])
    channels = int(net.config.in_channels)
    size = int(net.config.sample_size)
    distiller = Distiller(net, dict(pipe.scheduler.config), float(scale), conditioning, channels, size)
    return distiller, root / "transformer"


def distill_embeddings(model: str, cfg: DistillConfig, losses: list[str], out: Path, *, force: bool = False,
                       seed: int = 0, on_progress: Callable[[str, int, float], None] | None = None,
                       prompts: Path | None = None, guidance_scale: float | None = None,
                       max_sequence_length: int | None = None) -> DistillOutcome:
    """Check the output, distill once per loss and write the run with the lower held-out final-sample error, or the
    model's own embeddings (initial shifts: zero) when neither run beats them on that set (`info.kept` says which)."""
    from tmpdiff.commands.export import model_root

    out = check_outputs([Output.file("--out", out, ".safetensors")], force=force,
                        inputs=[prompts, model_root(model)])["--out"]
    if cfg.steps < 1:
        raise TmpdiffError(f"--steps must be at least 1, got {cfg.steps}")
    torch.manual_seed(seed)
    texts = None
    if prompts is not None:
        from tmpdiff.runtime.capture import read_prompts

        texts = read_prompts(prompts)
    distiller, denoiser_dir = load_distiller(model, prompts=texts, guidance_scale=guidance_scale,
                                             max_sequence_length=max_sequence_length)
    timesteps = distiller.timesteps(cfg.solver, cfg.steps)
    if len(set(timesteps)) != len(timesteps):
        raise TmpdiffError(f"{cfg.solver} repeats timesteps at {cfg.steps} steps: use fewer steps")
    data = distiller.data(cfg)
    results = {}
    for loss in losses:
        results[loss] = distiller.distill(cfg, loss, data,  # type: ignore[arg-type]
                                          None if on_progress is None else lambda i, v, loss=loss: on_progress(loss, i, v))
    best = min(results, key=lambda k: results[k].record.validation_mse)
    # the model's own rows (plain sampling) on the same held-out set: training that does not beat them is not kept
    initial = distiller.initial(cfg)
    initial_mse = distiller.evaluate(cfg, "final", initial, data.val_labels, data.val_noise, data.val_reference)
    learned = results[best].record.validation_mse < initial_mse
    tensor = results[best].tensor if learned else initial
    info = embeddings_info(distiller, cfg, denoiser_dir.parent.name, tensor, best,  # type: ignore[arg-type]
                           [r.record for r in results.values()], model_content_hash(denoiser_dir),
                           kept="learned" if learned else "initial", initial_validation_mse=initial_mse)
    save_time_embeddings(out, tensor, info)
    return DistillOutcome(info, out, results)
