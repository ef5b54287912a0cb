"""Quantization calibration data from real sampling: the denoiser's inputs at every step of reference runs.

The torch model runs as an engine inside the one sampling loop; every call's bound inputs (cond and
uncond rows, scaled latents, timesteps, labels) are copied out as one calibration batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tmpdiff.engines.base import TORCH_DTYPES
from tmpdiff.engines.torch_engine import TorchEngine
from tmpdiff.export.calibration_data import CalibrationRecipe, CalibrationSet
from tmpdiff.formats.atomic import read_json_object, read_text_file
from tmpdiff.formats.config_values import encode_non_finite
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import SAVE_RECORD_KEYS, SamplingInfo, folder_content_hash
from tmpdiff.models.adapter import DenoiserAdapter, model_dtype
from tmpdiff.models.schedulers import (
    check_distinct_timesteps,
    check_step_count,
    load_scheduler,
    sampling_scheduler,
)
from tmpdiff.runtime.dropin import call_feeds, copy_into
from tmpdiff.runtime.pipeline_io import (
    call_kwargs,
    conditioning_kwargs,
    default_guidance_of,
    final_latents,
    load_pipeline,
    pipeline_denoiser_name,
    takes_class_labels,
)
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise
from tmpdiff.runtime.time_conditioning import feed_time_conditioning


def sampled_recipe(sampling: SamplingInfo, classes: Sequence[int], seeds: Sequence[int],
                   steps: int | None = None, guidance_scale: float | None = None) -> CalibrationRecipe:
    """The recipe of `sampled_calibration` (checked now, captured only when an export needs the data); `steps` and
    `guidance_scale` default to the model's sampling info."""
    classes, seeds = list(classes), list(seeds)
    if not classes or not seeds:
        raise TmpdiffError("calibration set is empty: give at least one class and one seed")
    steps = steps or sampling.default_steps
    check_calibration_steps(sampling_scheduler(sampling), steps, distinct=True)
    if guidance_scale is not None:
        check_calibration_guidance(guidance_scale)
        sampling = sampling.model_copy(update={"guidance_scale": float(guidance_scale)})
    description = {"source": "sampled trajectories, fp32 torch", "classes": classes, "seeds": seeds, "steps": steps,
                   "guidance_scale": sampling.guidance_scale, "scheduler": sampling.scheduler_class,
                   "scheduler_config": encode_non_finite(sampling.scheduler_config)}
    return CalibrationRecipe(description, lambda model, adapter: sampled_calibration(model, adapter, sampling, classes,
                                                                                      seeds, steps))


def check_calibration_steps(scheduler, steps: int, distinct: bool = False) -> None:
    """`--calib-steps`: what `calibrate` checks its steps with (`check_distinct_timesteps` where the step count is the
    denoiser calls; else the step cap and the scheduler's training timesteps), refused by the option's name."""
    try:
        (check_distinct_timesteps if distinct else check_step_count)(scheduler, steps)
    except TmpdiffError as exc:
        raise TmpdiffError(f"--calib-steps {steps}: {exc}") from None


def check_calibration_guidance(guidance_scale: float) -> None:
    """`--calib-guidance`: a finite number, as `run --guidance` is checked."""
    if not math.isfinite(guidance_scale):
        raise TmpdiffError(f"--calib-guidance must be a finite number, got {guidance_scale}")


def torch_label(model: torch.nn.Module) -> str:
    """How a calibration source names the torch model it ran: its loaded dtype ("fp32 torch", "fp16 torch")."""
    dtype = model_dtype(model)
    return f"{TORCH_DTYPE_NAMES.get(dtype, str(dtype).removeprefix('torch.'))} torch"


TORCH_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def captured_on(model: torch.nn.Module) -> dict:
    """What computed a captured calibration set: torch's version and the model's device (on CPU, the kernel set torch
    dispatched to). The quantizers' scales follow from the captured tensors, which differ in their last bits between
    kernel sets (the bundled DiT's int8 graph differs between AVX2 and AVX-512 kernels), so two exports of one recipe
    on different hosts can differ; this tells which."""
    from tmpdiff.engines.device import cpu_name

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        return {"torch": torch.__version__, "device": f"cuda: {torch.cuda.get_device_name(device)}"}
    if device.type == "cpu":
        return {"torch": torch.__version__, "device": f"cpu: {cpu_name()}",
                "kernels": torch.backends.cpu.get_cpu_capability()}
    return {"torch": torch.__version__, "device": device.type}


def sampled_calibration(model: torch.nn.Module, adapter: DenoiserAdapter, sampling: SamplingInfo, classes: Sequence[int],
                        seeds: Sequence[int], steps: int | None = None) -> CalibrationSet:
    """Inputs of every step of the trajectories of `classes` x `seeds`, sampled by the torch model (as loaded)."""
    if not classes or not seeds:
        raise TmpdiffError("calibration set is empty: give at least one class and one seed")
    steps = steps or sampling.default_steps
    batches: list[dict[str, torch.Tensor]] = []
    engine = TorchEngine.for_model(model, adapter, on_inputs=batches.append)
    runner = ScheduledRunner({"fp32": engine}, len(classes), sampling.channels, sampling.image_size,
                             sampling.guidance_scale, sampling.null_class, sampling.num_classes, nan_guard=False,
                             own_time_embeddings=getattr(adapter, "own_table", None))  # --time-embedding-input graphs
    labels = torch.tensor(list(classes), dtype=torch.int64)
    for seed in seeds:
        noise = initial_noise(len(labels), sampling.channels, sampling.image_size, seed)
        runner.sample(sampling_scheduler(sampling), labels, noise, ["fp32"] * steps)
    return CalibrationSet(batches, {"source": f"sampled trajectories, {torch_label(model)}", "classes": list(classes),
                                    "seeds": list(seeds), "steps": steps, "guidance_scale": sampling.guidance_scale,
                                    "captured_on": captured_on(model)})


def read_prompts(path: Path) -> list[str]:
    """A prompts file: one prompt per line; blank lines and lines starting with '#' are skipped."""
    lines = read_text_file(path, "prompts file").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise TmpdiffError("the prompts file has no prompts (one per line)", path)
    return prompts


@dataclass(frozen=True)
class PipelineCapture:
    """Pipeline runs whose denoiser inputs become the calibration set: `conditions` x `seeds`, `steps` steps each.
    `conditions` are prompts, or class labels (ints) for a pipeline that takes them (DiTPipeline)."""

    pipeline_dir: Path
    conditions: list[str] | list[int]
    seeds: list[int]
    steps: int
    guidance_scale: float | None  # None: the pipeline's default
    prompts_file: str | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.conditions) and not isinstance(self.conditions[0], str)

    def source(self, label: str = "fp32 torch") -> str:
        """What the calibration ran: the pipeline over prompts or class labels, with the `label`ed torch model."""
        return f"pipeline {'class labels' if self.labelled else 'prompts'}, {label}"

    def description(self, pipeline_class: str, scheduler: dict, conditioning: dict[str, str] | None = None) -> dict:
        common = {"pipeline": pipeline_class, "seeds": self.seeds, "steps": self.steps,
                  "guidance_scale": self.guidance_scale, "scheduler": scheduler}
        if conditioning:  # what turns the prompts into the denoiser's inputs: other weights, other calibration data
            common["conditioning"] = conditioning
        if self.labelled:
            return {"source": self.source(), "class_labels": list(self.conditions)} | common
        digest = hashlib.sha256("\n".join(self.conditions).encode()).hexdigest()
        return {"source": self.source(), "prompts": len(self.conditions), "prompts_sha256": digest} | common


def prompted_recipe(capture: PipelineCapture) -> CalibrationRecipe:
    """The recipe of `prompted_calibration`; its description (prompts digest or class labels, seeds, steps, guidance,
    the pipeline's scheduler) is read from the pipeline directory without loading any model."""
    if not capture.conditions or not capture.seeds:
        raise TmpdiffError("calibration set is empty: give at least one prompt (or class label) and one seed")
    if capture.steps < 1:
        raise TmpdiffError(f"--calib-steps must be at least 1, got {capture.steps}")
    if capture.guidance_scale is not None:
        check_calibration_guidance(capture.guidance_scale)
    pipeline_denoiser_name(capture.pipeline_dir)  # a pipeline directory with a denoiser, or a clear error now
    index = read_json_object(capture.pipeline_dir / "model_index.json")
    scheduler_path = capture.pipeline_dir / "scheduler" / "scheduler_config.json"
    # what a re-save changes (diffusers' version stamp) is not the scheduler: the same calibration either way
    scheduler = {k: v for k, v in read_json_object(scheduler_path).items() if k not in SAVE_RECORD_KEYS} \
        if scheduler_path.is_file() else {}
    scheduler = encode_non_finite(scheduler)
    if scheduler_path.is_file():  # the pipeline's steps are its num_inference_steps, not always its denoiser calls
        check_calibration_steps(load_scheduler(scheduler_path.parent), capture.steps)
    pipeline_class = str(index.get("_class_name"))
    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    if cls is not None and takes_class_labels(cls) != capture.labelled:  # the kind of conditioning it takes
        wanted = "class labels (--calib-classes)" if takes_class_labels(cls) else "prompts (--prompts)"
        raise TmpdiffError(f"{pipeline_class} is calibrated on {wanted}", capture.pipeline_dir / "model_index.json")
    if capture.guidance_scale is None:  # the pipeline's own default, read from its class (no model loaded)
        default = default_guidance_of(cls) if cls is not None else None
        capture = dataclasses.replace(capture, guidance_scale=default)
    description = capture.description(pipeline_class, scheduler, conditioning_hashes(capture.pipeline_dir))
    return CalibrationRecipe(description, lambda model, adapter: prompted_calibration(model, adapter, capture, description))


def conditioning_hashes(pipeline_dir: Path) -> dict[str, str]:
    """Content hash of each text encoder and tokenizer folder of a pipeline (`folder_content_hash`; weights are hashed
    once per file identity)."""
    return {folder.name: folder_content_hash(folder) for folder in sorted(pipeline_dir.iterdir())
            if folder.is_dir() and folder.name.startswith(("text_encoder", "tokenizer"))}


def prompted_calibration(model: torch.nn.Module, adapter: DenoiserAdapter, capture: PipelineCapture,
                         description: dict | None = None) -> CalibrationSet:
    """The denoiser's inputs at every step of the stock pipeline run over the prompts or class labels (one call per
    seed, all of them batched, cond and uncond rows as the pipeline makes them), with `model` (torch, as loaded) as
    its denoiser."""
    pipe = load_pipeline(capture.pipeline_dir, model)
    conditioning = conditioning_kwargs(pipe, capture.conditions, capture.pipeline_dir, ("--calib-classes", "--prompts"),
                                       num_classes=getattr(model.config, "num_embeds_ada_norm", None))
    batches: list[dict[str, torch.Tensor]] = []
    signature = inspect.signature(model.forward)
    specs = adapter.input_specs()

    def record(module, args, kwargs) -> None:
        call = dict(signature.bind(*args, **kwargs).arguments)
        call.pop("return_dict", None)
        feed_time_conditioning(call, None, None, getattr(adapter, "own_table", None), "calibration capture")
        feeds = call_feeds(specs, call, adapter.architecture)
        rows = int(torch.as_tensor(feeds[specs[0].name]).shape[0])
        dims = adapter.default_dims(rows)
        batch = {}
        for spec in specs:
            buffer = torch.zeros(spec.concrete(dims), dtype=TORCH_DTYPES[spec.dtype])  # class labels: int64
            copy_into(spec, buffer, feeds[spec.name], adapter)
            batch[spec.name] = buffer
        batches.append(batch)

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    guidance = capture.guidance_scale
    try:
        for seed in tqdm(capture.seeds, desc="capturing calibration inputs", leave=False):
            kwargs = call_kwargs(pipe, steps=capture.steps, seed=seed, guidance_scale=guidance,
                                 text_len=getattr(adapter, "text_len", None), sample_size=adapter.sample_size)
            try:
                final_latents(pipe, **conditioning, **kwargs)  # the decode (DiTPipeline's too) is not needed
            except ValueError as exc:
                raise TmpdiffError(f"{type(pipe).__name__} refused the call ({exc})", capture.pipeline_dir) from None
    finally:
        handle.remove()
    if not batches:
        raise TmpdiffError("the pipeline never called its denoiser", capture.pipeline_dir)
    recorded = dict(description or {}) | {"source": capture.source(torch_label(model))}  # the dtype it was loaded in
    rows = sum(int(next(iter(b.values())).shape[0]) for b in batches)
    if not capture.labelled:
        recorded["prompts_file"] = capture.prompts_file
    recorded |= {"calls": len(batches), "rows": rows, "captured_on": captured_on(model)}
    return CalibrationSet(batches, recorded)
