"""`tmpdiff distill-embeddings`: MTEO time embeddings (or timestep shifts) for an N-step solver, to a safetensors file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tmpdiff.calibration.mteo import DistillConfig, Distiller, DistillResult, model_parameters
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.outputs import Output, check_outputs
from tmpdiff.formats.time_embeddings import TimeEmbeddingsInfo
from tmpdiff.models.time_embeddings import save_time_embeddings


@dataclass
class DistillOutcome:
    info: TimeEmbeddingsInfo
    path: Path
    results: dict[str, DistillResult]


def load_distiller(model: str) -> tuple[Distiller, str]:
    """The frozen torch model of a bundled-style class-conditional model directory ('bundled' = the bundled DiT)."""
    from tmpdiff.models.bundled import load_model_info, sampling_info
    from tmpdiff.models.loading import load_diffusers_model

    info = load_model_info(model)
    sampling = sampling_info(info)
    net = load_diffusers_model(info.root, "transformer")
    distiller = Distiller(net, dict(sampling.scheduler_config), sampling.guidance_scale, sampling.null_class,
                          sampling.num_classes, sampling.channels, sampling.image_size)
    return distiller, info.root.name


def distill_embeddings(model: str, cfg: DistillConfig, losses: list[str], out: Path, *, force: bool = False,
                       seed: int = 0, on_progress: Callable[[str, int, float], None] | None = None) -> DistillOutcome:
    """Check the output, distill once per loss, keep the one with the lower held-out final-sample error, write it."""
    out = check_outputs([Output.file("--out", out, ".safetensors")], force=force)["--out"]
    if cfg.steps < 1:
        raise TmpdiffError(f"--steps must be at least 1, got {cfg.steps}")
    torch.manual_seed(seed)
    distiller, name = load_distiller(model)
    timesteps = distiller.timesteps(cfg.solver, cfg.steps)
    if len(set(timesteps)) != len(timesteps):
        raise TmpdiffError(f"{cfg.solver} repeats timesteps at {cfg.steps} steps: use fewer steps")
    data = distiller.data(cfg)
    results = {}
    for loss in losses:
        results[loss] = distiller.distill(cfg, loss, data,  # type: ignore[arg-type]
                                          None if on_progress is None else lambda i, v, loss=loss: on_progress(loss, i, v))
    kept = min(results, key=lambda k: results[k].record.validation_mse)
    tensor = results[kept].tensor
    scheduler = distiller.sampler(cfg.steps)
    info = TimeEmbeddingsInfo(
        kind=cfg.kind, model=name, model_parameters=model_parameters(distiller.model), solver=cfg.solver,
        steps=cfg.steps, timesteps=timesteps,
        slots=scheduler.slots if cfg.kind == "mteo" else [], dim=int(tensor.shape[-1]) if cfg.kind == "mteo" else 0,
        trained_parameters=int(tensor.numel()), guidance_scale=distiller.guidance_scale,
        reference_steps=cfg.reference_steps, train_seed=cfg.train_seed, train_samples=cfg.train_samples,
        validation_seed=cfg.validation_seed, iterations=cfg.iterations, loss=kept,  # type: ignore[arg-type]
        runs=[r.record for r in results.values()])
    save_time_embeddings(out, tensor, info)
    return DistillOutcome(info, out, results)
