"""TMPQ-DM candidates inside a text-to-image pipeline: the super-network as the pipeline's denoiser.

The stock diffusers pipeline (text encoder, scheduler, classifier-free guidance, VAE) samples the prompts x seeds
with an `EngineDenoiser` whose engines are the super-network at each distinct layer configuration of the candidate
(`tmpq_eval.ConfigEngine`), at the candidate's timesteps (the pipeline's `timesteps=`); so a candidate runs exactly as
its deployed engines will through the drop-in. Quality: prompt adherence (all attributes right) and the attribute
classifier's confidence in them, when the pipeline ships one (the bundled one does); beside them SSIM/PSNR of the
decoded RGB images and the latent error, against fp32 at the reference step count on the same prompts and seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tmpdiff.calibration.pipeline_session import attribute_judge
from tmpdiff.calibration.tmpq import EvaluationSets, TmpqOptions
from tmpdiff.calibration.tmpq_eval import config_engines, relative_latent_error
from tmpdiff.eval.rgb import mean_rgb_metrics
from tmpdiff.export.supernet import SuperNet
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import MANIFEST_NAME, Manifest, load_manifest
from tmpdiff.formats.schedule import Schedule, SchedulerRef
from tmpdiff.models.registry import adapter_for_config
from tmpdiff.models.schedulers import set_custom_timesteps, train_timesteps
from tmpdiff.runtime.dropin import denoiser_component, engine_denoiser
from tmpdiff.runtime.pipeline_io import (
    call_kwargs,
    call_parameters,
    check_pipeline_denoiser,
    decode_latents,
    default_guidance_of,
    load_pipeline,
)
from tmpdiff.runtime.plan import PrecisionPlan


class PipelinePlanEvaluator:
    """Samples candidate plans through the pipeline on `prompts` x `seeds` (one call per seed) and scores them."""

    def __init__(self, pipe, manifest: Manifest, supernet: SuperNet, prompts: Sequence[str], seeds: Sequence[int],
                 reference_steps: int, guidance_scale: float | None, judge: tuple[object, list] | None) -> None:
        if not prompts or not seeds:
            raise TmpdiffError("the evaluation set is empty: give at least one prompt and one seed")
        self.pipe, self.manifest, self.supernet = pipe, manifest, supernet
        self.adapter = adapter_for_config(manifest.denoiser_config)
        self.prompts, self.seeds = list(prompts), list(seeds)
        self.guidance_scale = guidance_scale
        self.judge = judge  # (attribute classifier, the combos each sample asks for) or None
        self.runs = 0
        self.reference = self.sample([supernet.uniform("fp32")] * reference_steps, None)
        self.reference_images = decode_latents(pipe, self.reference)
        self.runs = 0

    @torch.no_grad()
    def sample(self, configs: Sequence[Sequence[str]], timesteps: Sequence[int] | None) -> torch.Tensor:
        """Final latents (seed-major) of one plan: `configs[i]` runs step i, at `timesteps[i]` if given."""
        engines, labels = config_engines(self.supernet, configs, self.adapter)
        view = None if timesteps is None else Schedule(steps=len(labels), timesteps=list(timesteps),
                                                       precisions=["fp32"] * len(labels))
        plan = PrecisionPlan(tuple(labels), None, "tmpq-dm candidate", view)
        denoiser = engine_denoiser(engines, self.manifest, self.adapter, plan, scheduler_of=lambda: self.pipe.scheduler,
                                   nan_guard=False)
        component = denoiser_component(self.pipe)
        setattr(self.pipe, component, denoiser)
        denoiser.pipelines.add(self.pipe)
        latents = []
        try:
            for seed in self.seeds:
                kwargs = call_kwargs(self.pipe, steps=len(labels), seed=seed, guidance_scale=self.guidance_scale,
                                     text_len=getattr(self.adapter, "text_len", None),
                                     sample_size=denoiser.config.get("sample_size"))
                if timesteps is not None:
                    kwargs["timesteps"] = list(timesteps)
                latents.append(self.pipe(list(self.prompts), output_type="latent", **kwargs).images.float().cpu())
        finally:
            setattr(self.pipe, component, None)
        self.runs += 1
        return torch.cat(latents)

    @torch.no_grad()
    def quality(self, latents: torch.Tensor) -> dict[str, float]:
        """Adherence (`accuracy`) and confidence (mean probability of every asked attribute, multiplied) when the
        pipeline has an attribute judge, else NaN; SSIM, PSNR (RGB) and latent error vs fp32."""
        images = decode_latents(self.pipe, latents)
        ssim, psnr = mean_rgb_metrics(images, self.reference_images)
        out = {"ssim": ssim, "psnr": psnr, "latent_error": relative_latent_error(latents, self.reference),
               "accuracy": float("nan"), "confidence": float("nan")}
        if self.judge is not None:
            from tmpdiff.models.colored_digits import attributes

            classifier, combos = self.judge
            wanted = attributes(combos)
            heads = classifier(images * 2 - 1)
            probs = torch.stack([h.softmax(dim=1).gather(1, wanted[:, i:i + 1])[:, 0] for i, h in enumerate(heads)], 1)
            right = torch.stack([h.argmax(dim=1) for h in heads], 1) == wanted
            out |= {"accuracy": float(right.all(dim=1).float().mean()), "confidence": float(probs.prod(dim=1).mean())}
        return out


def pipeline_sets(build_dir: Path, pipeline_dir: Path, prompts: Sequence[str], holdout_prompts: Sequence[str],
                  options: TmpqOptions, guidance_scale: float | None = None) -> EvaluationSets:
    """A text-to-image build searched inside its pipeline: calibration = `prompts` x `options.seeds`, held-out =
    `holdout_prompts` x `options.holdout_seeds`; the plan samples with the pipeline's scheduler."""
    manifest = load_manifest(build_dir)
    check_pipeline_denoiser(pipeline_dir, manifest.model_sha256, build_dir / MANIFEST_NAME)
    pipe = load_pipeline(pipeline_dir)
    if "timesteps" not in call_parameters(pipe):
        raise TmpdiffError(f"{type(pipe).__name__} takes no timesteps=: a TMPQ-DM plan's chosen timesteps cannot be "
                           "sampled in it", pipeline_dir)
    # candidates sample at custom timesteps: a scheduler that cannot is refused here, before any sampling
    set_custom_timesteps(type(pipe.scheduler).from_config(pipe.scheduler.config), [999, 500], pipeline_dir)
    if options.metric in ("confidence", "accuracy") and attribute_judge(pipeline_dir, list(prompts)) is None:
        raise TmpdiffError(f"--metric {options.metric} needs the pipeline's attribute classifier and prompts it can "
                           "read; use ssim or latent", pipeline_dir)
    judges = {}

    def evaluator(texts: Sequence[str], seeds: Sequence[int]):
        labels = [p for _ in seeds for p in texts]
        if tuple(labels) not in judges:
            judges[tuple(labels)] = attribute_judge(pipeline_dir, labels)
        return lambda supernet: PipelinePlanEvaluator(pipe, manifest, supernet, texts, seeds, options.reference_steps,
                                                      guidance_scale, judges[tuple(labels)])

    scheduler = SchedulerRef(class_name=type(pipe.scheduler).__name__, config=dict(pipe.scheduler.config))
    # the scale sampled with, the pipeline's default included: a run at another is refused (`calibrated_guidance`)
    used = guidance_scale if guidance_scale is not None else default_guidance_of(type(pipe))
    record = {"pipeline": str(pipeline_dir), "guidance_scale": used}
    return EvaluationSets(evaluator(prompts, options.seeds), evaluator(holdout_prompts, options.holdout_seeds),
                          train_timesteps(pipe.scheduler), scheduler,
                          record | {"seeds": list(options.seeds), "prompts": list(prompts)},
                          record | {"seeds": list(options.holdout_seeds), "prompts": list(holdout_prompts)})
