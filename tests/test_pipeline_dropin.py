"""The diffusers drop-in: tiny PixArt-Sigma, SD3, Flux, SD1.5 (UNet + DDIM), SDXL (added conditioning) and Sana
pipelines with their denoiser replaced by ORT engines."""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest
import torch

from tests import tiny_pipelines
from tests.cli_helpers import cli_run
from tmpdiff.engines.build import build_engines
from tmpdiff.export.exporter import export_model
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.runtime.dropin import attach_engines, denoiser_component

STEPS = 4
UNET_PIPELINES = ("sd15", "sdxl")  # CLIP-only text: no max_sequence_length argument
PROMPTS = ["a photo of a cat", "red house on the hill"]


@pytest.fixture(scope="module", params=list(tiny_pipelines.PIPELINES))
def exported(request, tmp_path_factory):
    """(name, build dir with fp32 + int8 ORT engines) for each tiny pipeline's denoiser."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model_dir = tiny_pipelines.save_denoiser(tiny_pipelines.build(name), root / "transformer")
    build_dir, _ = export_model(model_dir, root / "build", ["fp32", "int8"], model_id=name,
                                graph_sizes=tiny_pipelines.PIPELINES[name][1])
    build_engines(build_dir, "ort", "cpu")
    return name, build_dir


def _call(pipe, name: str, steps: int = STEPS, output_type: str = "np", **extra) -> np.ndarray:
    kwargs = {"height": tiny_pipelines.SIZE, "width": tiny_pipelines.SIZE} | tiny_pipelines.PIPELINES[name][2] | extra
    out = pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type=output_type,
               **kwargs)
    images = out.images
    return images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_fp32_engines_reproduce_the_torch_pipeline(exported):
    name, build_dir = exported
    pipe = tiny_pipelines.build(name)
    want_latents, want_images = _call(pipe, name, output_type="latent"), _call(pipe, name)
    denoiser = attach_engines(pipe, build_dir, schedule=["fp32"] * STEPS)
    assert type(getattr(pipe, denoiser_component(pipe))).__name__ == "EngineDenoiser"
    got_latents, got_images = _call(pipe, name, output_type="latent"), _call(pipe, name)
    print(f"{name}: fp32 engines vs torch, latents {_relative(got_latents, want_latents):.2e} relative, "
          f"images {np.abs(got_images - want_images).max():.2e} max abs")
    assert _relative(got_latents, want_latents) < 1e-4, f"{name}: latents differ by {_relative(got_latents, want_latents):.2e}"
    assert np.abs(got_images - want_images).max() < 1e-3
    assert [e.precision for e in denoiser.trace.steps] == ["fp32"] * STEPS
    assert [e.index for e in denoiser.trace.steps] == list(range(STEPS))


def test_mixed_schedule_runs_the_precisions_it_names(exported):
    name, build_dir = exported
    pipe = tiny_pipelines.build(name)
    reference = _call(pipe, name, output_type="latent")
    schedule = ["fp32", "int8", "int8", "fp32"]
    denoiser = attach_engines(pipe, build_dir, schedule=schedule)
    mixed = _call(pipe, name, output_type="latent")
    assert [e.precision for e in denoiser.trace.steps] == schedule
    assert not denoiser.trace.fallbacks and denoiser.trace.switches == 2
    assert np.isfinite(mixed).all()
    error = _relative(mixed, reference)
    print(f"{name}: schedule {schedule} vs the torch pipeline, latents {error:.2e} relative")
    assert 0 < error < 0.5, f"{name}: int8 steps moved the latents by {error:.2e}"


def test_uniform_precision_follows_any_step_count(exported):
    name, build_dir = exported
    pipe = tiny_pipelines.build(name)
    denoiser = attach_engines(pipe, build_dir, precision="int8")
    _call(pipe, name, steps=3)
    assert [e.precision for e in denoiser.trace.steps] == ["int8"] * 3


@pytest.mark.parametrize("exported", ["pixart"], indirect=True)  # one pipeline class is enough for this path
def test_pipeline_loaded_without_its_denoiser(exported, tmp_path):
    """The deployment path: the torch denoiser is never loaded; config and signature come from the build dir."""
    from diffusers import DiffusionPipeline

    name, build_dir = exported
    pipe = tiny_pipelines.build(name)
    want = _call(pipe, name, output_type="latent")
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", transformer=None, local_files_only=True, use_safetensors=True)
    assert loaded.transformer is None
    attach_engines(loaded, build_dir, precision="fp32")
    assert _relative(_call(loaded, name, output_type="latent"), want) < 1e-4


@pytest.mark.parametrize("exported", ["sd3"], indirect=True)
def test_cli_runs_prompts_through_a_pipeline_directory(exported, tmp_path):
    """`tmpdiff run --pipeline DIR --prompt ...`: image, per-step table, Chrome trace; the schedule's precisions ran."""
    from PIL import Image

    from tmpdiff.formats.schedule import Schedule, save_schedule

    name, build_dir = exported
    tiny_pipelines.build(name).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    save_schedule(Schedule(steps=STEPS, precisions=["fp32", "int8", "fp32", "int8"]), tmp_path / "schedule.json")
    args = ["run", str(build_dir), "--pipeline", str(tmp_path / "pipe"), "--prompt", "a red house", "--prompt", "a blue tree",
            "--schedule", str(tmp_path / "schedule.json"), "--out", str(tmp_path / "image.png"), "--trace", str(tmp_path / "trace.json")]
    done = cli_run(*args)
    assert done.returncode == 0, done.stderr
    assert "total" in done.stdout and "3 engine switches" in done.stdout
    assert Image.open(tmp_path / "image.png").mode == "RGB"
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert [e["name"] for e in events if e["ph"] == "X"] == [f"step {i} {p}" for i, p in enumerate(["fp32", "int8", "fp32", "int8"])]

    wrong = cli_run(*args, "--steps", "3", "--force")
    assert wrong.returncode == 2 and "4 steps but --steps 3" in wrong.stderr and "Traceback" not in wrong.stderr
    empty = cli_run(*args[:4], "--prompt", " ", "--precision", "fp32")
    assert empty.returncode == 2 and "non-empty" in empty.stderr


def test_mismatches_are_caught_before_the_first_step(exported):
    name, build_dir = exported
    pipe = tiny_pipelines.build(name)
    denoiser = attach_engines(pipe, build_dir, schedule=["fp32"] * STEPS)
    calls = rf"schedule has {STEPS} steps \(one per denoiser call\) but the pipeline makes 3 calls"
    with pytest.raises(TmpdiffError, match=rf"{calls}: call it with num_inference_steps={STEPS}"):
        _call(pipe, name, steps=3)
    assert denoiser.trace.steps == []
    short_text = rf"passes {tiny_pipelines.TEXT_LEN - 2}: .* re-export with --text-len {tiny_pipelines.TEXT_LEN - 2}"
    with pytest.raises(TmpdiffError, match=short_text if name in UNET_PIPELINES else "max_sequence_length to match"):
        if name in UNET_PIPELINES:  # CLIP's length is the tokenizer's: hand the pipeline shorter embeddings instead
            width = getattr(pipe, denoiser_component(pipe)).config["cross_attention_dim"]
            short = torch.zeros(len(PROMPTS), tiny_pipelines.TEXT_LEN - 2, width)
            pooled = {"pooled_prompt_embeds": torch.zeros(len(PROMPTS), 32),
                      "negative_pooled_prompt_embeds": torch.zeros(len(PROMPTS), 32)} if name == "sdxl" else {}
            pipe(prompt_embeds=short, negative_prompt_embeds=short, num_inference_steps=STEPS, output_type="latent", **pooled)
        else:
            _call(pipe, name, max_sequence_length=tiny_pipelines.TEXT_LEN - 2)
    with pytest.raises(TmpdiffError, match="latent size is fixed"):
        size = 2 * tiny_pipelines.PIPELINES[name][2].get("height", tiny_pipelines.SIZE)
        _call(pipe, name, output_type="latent", height=size, width=size)


@pytest.mark.parametrize("exported", ["pixart"], indirect=True)
def test_export_with_other_graph_sizes_replaces_the_build(exported):
    """A new text length is another graph: the export starts the build directory over instead of mixing sizes."""
    name, build_dir = exported
    model_dir = build_dir.parent.parent / "transformer"
    other, [outcome] = export_model(model_dir, build_dir.parent.parent / "other", ["fp32"], model_id=name, graph_sizes={"text_len": 6})
    from tmpdiff.formats.manifest import load_manifest

    shapes = {s.name: s.shape for s in load_manifest(other).inputs}
    assert shapes["encoder_hidden_states"][1] == 6 and shapes["encoder_attention_mask"] == ["batch", 6]
    again, [outcome] = export_model(model_dir, build_dir.parent.parent / "other", ["fp32"], model_id=name,
                                    graph_sizes={"text_len": 7})
    assert not outcome.skipped and load_manifest(again).inputs[1].shape[1] == 7


def test_attach_refuses_what_does_not_fit(exported):
    name, build_dir = exported
    with pytest.raises(TmpdiffError, match="fp8"):
        attach_engines(tiny_pipelines.build(name), build_dir, schedule=["fp32", "fp8", "fp32", "fp32"])
    with pytest.raises(TmpdiffError, match="unknown precision"):
        attach_engines(tiny_pipelines.build(name), build_dir, schedule=["fp32", "fp64", "fp32", "fp32"])
    other = tiny_pipelines.build(name)
    getattr(other, denoiser_component(other)).register_to_config(in_channels=3)
    with pytest.raises(TmpdiffError, match="in_channels"):
        attach_engines(other, build_dir, precision="fp32")


@pytest.mark.parametrize("exported", ["sd15"], indirect=True)
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_a_pipeline_starting_partway_runs_its_steps_precisions(exported, scheduler):
    """img2img at strength 0.5 runs the last 2 of 4 timesteps: steps 2 and 3 of the schedule, also with a scheduler
    that keeps no step index (DDIM ran steps 0 and 1's precisions, and traced their timesteps)."""
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline

    name, build_dir = exported
    pipe = tiny_pipelines.build(name)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    schedule = ["fp32", "int8", "int8", "fp32"]
    denoiser = attach_engines(img2img, build_dir, schedule=schedule)
    img2img(PROMPTS[0], image=torch.rand(1, 3, tiny_pipelines.SIZE, tiny_pipelines.SIZE), strength=0.5,
            num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent")
    timesteps = [int(t) for t in img2img.scheduler.timesteps]
    assert [(e.index, e.timestep, e.precision) for e in denoiser.trace.steps] == \
        [(2, timesteps[2], "int8"), (3, timesteps[3], "fp32")]


@pytest.mark.parametrize("exported", ["sd15"], indirect=True)
def test_img2img_with_pndm_starting_at_its_repeated_timestep_runs_its_steps_precisions(exported):
    """PNDM repeats a timestep ([751, 501, 501, 251, 1] for 4 inference steps); img2img at strength 0.5 runs
    timesteps[2:], whose first value also stands at step 1: the calls are steps 2, 3 and 4 (were 1, 2, 3)."""
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline

    name, build_dir = exported
    pipe = tiny_pipelines.build(name)
    pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    denoiser = attach_engines(img2img, build_dir, schedule=["fp32", "int8", "fp32", "int8", "fp32"])
    img2img(PROMPTS[0], image=torch.rand(1, 3, tiny_pipelines.SIZE, tiny_pipelines.SIZE), strength=0.5,
            num_inference_steps=denoiser.num_inference_steps, generator=torch.Generator().manual_seed(0),
            output_type="latent")
    timesteps = [int(t) for t in img2img.scheduler.timesteps]
    assert timesteps[1] == timesteps[2]
    assert [(e.index, e.timestep, e.precision) for e in denoiser.trace.steps] == \
        [(2, timesteps[2], "fp32"), (3, timesteps[3], "int8"), (4, timesteps[4], "fp32")]


@pytest.mark.parametrize("exported", ["sd15"], indirect=True)
def test_pndm_runs_a_schedule_of_one_precision_per_call(exported, tmp_path):
    """SD1.x's stock PNDM calls the denoiser twice at its first timestep (N inference steps, N + 1 calls): the drop-in
    names the step count that fits the schedule, the fp32 engines reproduce the torch pipeline, and the CLI's
    `--steps` counts calls."""
    from diffusers import PNDMScheduler

    name, build_dir = exported
    pipe = tiny_pipelines.build(name)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    want = _call(pipe, name, steps=STEPS - 1, output_type="latent")
    schedule = ["fp32", "int8", "fp32", "int8"]
    denoiser = attach_engines(pipe, build_dir, schedule=["fp32"] * STEPS)
    assert denoiser.num_inference_steps == STEPS - 1
    assert _relative(_call(pipe, name, steps=denoiser.num_inference_steps, output_type="latent"), want) < 1e-4
    with pytest.raises(TmpdiffError, match=rf"makes {STEPS + 1} calls: call it with num_inference_steps={STEPS - 1}"):
        _call(pipe, name, steps=STEPS)

    saved = tiny_pipelines.build(name)
    saved.scheduler = pipe.scheduler
    saved.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    from tmpdiff.formats.schedule import Schedule, save_schedule

    save_schedule(Schedule(steps=STEPS, precisions=schedule), tmp_path / "schedule.json")
    args = ["run", str(build_dir), "--pipeline", str(tmp_path / "pipe"), "--prompt", "a red house",
            "--schedule", str(tmp_path / "schedule.json"), "--out", str(tmp_path / "image.png"), "--trace", str(tmp_path / "trace.json")]
    done = cli_run(*args)
    assert done.returncode == 0, done.stderr
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert [e["name"] for e in events if e["ph"] == "X"] == [f"step {i} {p}" for i, p in enumerate(schedule)]


def test_the_calls_a_step_count_makes():
    from diffusers import DDIMScheduler, HeunDiscreteScheduler, PNDMScheduler

    from tmpdiff.models.schedulers import check_distinct_timesteps, inference_steps_for, set_sampling_timesteps

    pndm = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    assert [inference_steps_for(pndm, calls) for calls in (1, 3, 21)] == [1, 2, 20]
    assert inference_steps_for(DDIMScheduler(), 20) == 20
    with pytest.raises(TmpdiffError, match="PNDMScheduler makes no step count of exactly 2 denoiser calls"):
        inference_steps_for(pndm, 2)
    with pytest.raises(TmpdiffError, match="HeunDiscreteScheduler makes no step count of exactly 4"):
        inference_steps_for(HeunDiscreteScheduler(), 4)
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's config: setting its steps needs the pipeline's `mu`, which moves the timesteps, not their count
    assert inference_steps_for(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 4) == 4
    set_sampling_timesteps(pndm, 9)
    assert len(pndm.timesteps) == 9 and pndm.num_inference_steps == 8
    check_distinct_timesteps(pndm, 9)  # PNDM's own repeat at its first timestep is not refused
    check_distinct_timesteps(HeunDiscreteScheduler(), 5)  # nor Heun's two calls per timestep (3 inference steps)
    check_distinct_timesteps(PNDMScheduler(), 13)  # nor PNDM's Runge-Kutta warm-up (4 inference steps)
    from diffusers import DPMSolverMultistepScheduler

    check_distinct_timesteps(DPMSolverMultistepScheduler(), 999)
    with pytest.raises(TmpdiffError, match=r"repeats timesteps at 1000 steps \(999 distinct for 1000 inference steps"):
        check_distinct_timesteps(DPMSolverMultistepScheduler(), 1000)


@pytest.mark.parametrize("exported", ["pixart"], indirect=True)
def test_a_schedule_from_another_noise_process_is_refused(exported):
    from tmpdiff.formats.schedule import Schedule, SchedulerRef

    name, build_dir = exported
    pipe = tiny_pipelines.build(name)
    own = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}  # not _use_default_values
    config = own | {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    other = Schedule(steps=STEPS, precisions=["fp32"] * STEPS,
                     scheduler=SchedulerRef(class_name=type(pipe.scheduler).__name__, config=config))
    with pytest.raises(TmpdiffError, match="another noise process than the pipeline's"):
        attach_engines(pipe, build_dir, schedule=other)
    same = other.model_copy(update={"scheduler": SchedulerRef(class_name=type(pipe.scheduler).__name__, config=own)})
    attach_engines(pipe, build_dir, schedule=same)


@pytest.mark.parametrize("exported", ["pixart"], indirect=True)
def test_a_recorded_scheduler_is_checked_at_every_pipeline_call(exported, tmp_path):
    """A schedule that records its scheduler is refused, before any engine runs, at a call after `pipe.scheduler` was
    replaced since attach, and at a call given other timesteps than that scheduler's own for the step count; a plain
    list of precisions still runs at any timesteps."""
    from diffusers import EulerDiscreteScheduler

    from tmpdiff.formats.schedule import Schedule, SchedulerRef, save_schedule

    name, build_dir = exported
    pipe = tiny_pipelines.build(name)
    own = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    schedule = ["fp32", "int8", "int8", "fp32"]
    save_schedule(Schedule(steps=STEPS, precisions=schedule,
                           scheduler=SchedulerRef(class_name=type(pipe.scheduler).__name__, config=own)),
                  tmp_path / "cal.json")
    denoiser = attach_engines(pipe, build_dir, schedule=tmp_path / "cal.json")
    _call(pipe, name, output_type="latent")
    assert [e.precision for e in denoiser.trace.steps] == schedule
    with pytest.raises(TmpdiffError, match=r"cal\.json: the schedule was calibrated with DPMSolverMultistepScheduler's "
                                           r"own 4 timesteps \(999, 749, 500, 250\), this pipeline call samples at "
                                           r"999, 980, 960, 940"):
        _call(pipe, name, output_type="latent", timesteps=[999, 980, 960, 940])
    assert denoiser.trace.steps == []
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(TmpdiffError, match=r"cal\.json: the schedule was calibrated with DPMSolverMultistepScheduler, "
                                           r"the pipeline samples with EulerDiscreteScheduler"):
        _call(pipe, name, output_type="latent")
    assert denoiser.trace.steps == []

    plain = tiny_pipelines.build(name)
    denoiser = attach_engines(plain, build_dir, schedule=schedule)
    _call(plain, name, output_type="latent", timesteps=[999, 980, 960, 940])
    assert [(e.timestep, e.precision) for e in denoiser.trace.steps] == list(zip([999, 980, 960, 940], schedule, strict=True))


def test_a_scheduler_reset_during_a_call_refuses_the_call(exported):
    """Another thread's call on the same pipeline resets the scheduler (new timesteps) while this call runs, and this
    call's own scheduler.step then advances the reset state: the next denoiser call must not take the new timesteps as
    a fresh call of its own (it ran on with the other call's state, 5e-2 off, while the other call was refused)."""
    name, build_dir = exported
    pipe = tiny_pipelines.build(name)
    denoiser = attach_engines(pipe, build_dir, schedule=["fp32", "int8", "int8", "fp32"])

    def reset_by_another_call(step: int, latents: torch.Tensor) -> None:
        if step == 1:  # what the other thread's call and then this call's step do to the shared scheduler
            pipe.scheduler.set_timesteps(STEPS)
            pipe.scheduler.step(torch.zeros_like(latents), pipe.scheduler.timesteps[0], latents)

    if "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters:
        hook = {"callback_on_step_end": lambda _, step, t, tensors: reset_by_another_call(step, tensors["latents"])
                or {}}
    else:  # PixArt's older callback(step, t, latents)
        hook = {"callback": lambda step, t, latents: reset_by_another_call(step, latents)}
    if not hasattr(pipe.scheduler, "step_index"):
        pytest.skip(f"{type(pipe.scheduler).__name__} keeps no step index")
    with pytest.raises(TmpdiffError, match="scheduler was reset during a call"):
        _call(pipe, name, output_type="latent", **hook)
    with pytest.raises(TmpdiffError, match="in a call from another thread"):  # the other call's next step as well
        denoiser._follow_call(pipe.scheduler.timesteps, pipe.scheduler)
    _call(pipe, name, output_type="latent")  # a new call starts clean
    assert [e.precision for e in denoiser.trace.steps] == ["fp32", "int8", "int8", "fp32"]


@pytest.fixture(scope="module")
def dit_build(tmp_path_factory):
    """(pipeline dir, build dir with fp32 + int8 ORT engines) of a tiny DiTPipeline, int8 calibrated on the denoiser's
    inputs captured from the pipeline over class labels 1 and 7 (`export --calib-classes`)."""
    from tests.cli_helpers import cli

    root = tmp_path_factory.mktemp("dit")
    tiny_pipelines.dit_pipeline().save_pretrained(root / "pipe", safe_serialization=True)
    code, _, err = cli("export", root / "pipe", "--subfolder", "transformer", "--precisions", "fp32,int8", "--out",
                       root / "build", "--calib-classes", "1,7", "--calib-seeds", "0,1", "--calib-steps", str(STEPS))
    assert code == 0, err
    build_dir = root / "build" / "transformer"
    build_engines(build_dir, "ort", "cpu")
    return root / "pipe", build_dir


def test_a_class_label_pipeline_calibrates_quantization_on_its_labels(dit_build):
    """The export captured the denoiser's inputs from DiTPipeline's own calls: 2 seeds x STEPS calls, each with the
    labels' rows and the null class's (guidance)."""
    from tmpdiff.formats.manifest import load_manifest

    recorded = load_manifest(dit_build[1]).precisions["int8"].quantization["calibration"]
    assert recorded["source"] == "pipeline class labels, fp32 torch" and recorded["class_labels"] == [1, 7]
    assert recorded["calls"] == 2 * STEPS and recorded["rows"] == 2 * STEPS * 4
    assert recorded["pipeline"] == "DiTPipeline" and "prompts_file" not in recorded


def test_final_latents_of_a_pipeline_that_always_decodes():
    """DiTPipeline decodes whatever output it is asked for: `final_latents` takes the latents it hands its VAE, and
    decoding them gives the pipeline's own images."""
    from tmpdiff.runtime.pipeline_io import decode_latents, final_latents

    pipe = tiny_pipelines.dit_pipeline()
    kwargs = {"class_labels": [1, 7], "num_inference_steps": STEPS}
    latents = final_latents(pipe, generator=torch.Generator().manual_seed(3), **kwargs)
    want = pipe(generator=torch.Generator().manual_seed(3), output_type="pt", **kwargs).images
    assert latents.shape == (2, 4, 8, 8) and "decode" not in vars(pipe.vae)  # the stand-in decode is gone
    assert torch.allclose(decode_latents(pipe, latents), want, atol=1e-5)


def test_a_class_outside_the_models_labels_is_refused_by_name(dit_build, tmp_path):
    """`run --pipeline` with a label past the label table failed inside ONNX Runtime's Gather (a traceback); the null
    class itself (1000 here) is the pipeline's to add, not a class to ask for."""
    from tests.cli_helpers import cli

    pipe_dir, build_dir = dit_build
    for label in ("5000", "1000"):
        code, _, err = cli("run", build_dir, "--pipeline", pipe_dir, "--class", label, "--precision", "int8", "--steps",
                           str(STEPS), "--out", tmp_path / "x.png")
        assert code == 2 and f"--class {label} is outside the model's 1000 classes" in err, err
    assert not (tmp_path / "x.png").exists()


def test_drafts_guide_as_dit_pipeline_does(dit_build):
    """DiTPipeline's guided batch is [cond; uncond]: a draft jumps with the estimate the pipeline itself steps with
    (the drafts combined the halves the other way round, 6.5 max abs off)."""
    _, build_dir = dit_build
    pipe = tiny_pipelines.dit_pipeline()
    denoiser = attach_engines(pipe, build_dir, precision="fp32", parallel=2)
    raw, stepped = [], []
    forward, step = denoiser.forward, pipe.scheduler.step

    def recorded_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        raw.append((out[0] if isinstance(out, tuple) else out.sample).clone())
        return out

    def recorded_step(model_output, *args, **kwargs):
        stepped.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    denoiser.forward, pipe.scheduler.step = recorded_forward, recorded_step
    pipe(class_labels=[1, 7], num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
         output_type="np")
    assert len(raw) == len(stepped) == STEPS
    for output, want in zip(raw, stepped, strict=True):
        assert torch.allclose(denoiser.drafts.guided(output, 4), want[:2, :4], atol=1e-6)


def test_a_class_label_pipeline_runs_on_the_engines(dit_build, tmp_path):
    """DiTPipeline (class labels, latent space, learned sigma): the fp32 engines reproduce the torch pipeline's images,
    and `tmpdiff run --pipeline DIR --class ...` runs the schedule through it."""
    pipe_dir, build_dir = dit_build
    pipe = tiny_pipelines.dit_pipeline()
    want = pipe(class_labels=[1, 7], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                output_type="np").images
    denoiser = attach_engines(pipe, build_dir, schedule=["fp32"] * STEPS)
    got = pipe(class_labels=[1, 7], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
               output_type="np").images
    print(f"DiTPipeline: fp32 engines vs torch, images {np.abs(got - want).max():.2e} max abs")
    assert np.abs(got - want).max() < 1e-3 and np.abs(want).max() > 0
    assert [e.precision for e in denoiser.trace.steps] == ["fp32"] * STEPS  # the engines ran every step

    from tmpdiff.formats.schedule import Schedule, save_schedule

    schedule = ["fp32", "int8", "int8", "fp32"]
    save_schedule(Schedule(steps=STEPS, precisions=schedule), tmp_path / "schedule.json")
    from tests.cli_helpers import cli

    args = ["run", build_dir, "--pipeline", pipe_dir, "--class", "1,7", "--schedule", tmp_path / "schedule.json",
            "--out", tmp_path / "image.png", "--json"]
    code, out, err = cli(*args)
    assert code == 0, err
    assert [s["precision"] for s in json.loads(out)["steps"]] == schedule
    code, _, err = cli(*args[:4], "--prompt", "a cat", "--precision", "fp32", "--out", tmp_path / "p.png")
    assert code == 2 and "takes class labels, not prompts: pass --class" in err


def test_a_class_label_pipeline_is_calibrated_on_class_labels(dit_build, tmp_path):
    """`calibrate --pipeline DIR --calib-classes`: the search runs in DiTPipeline, the schedule records its labels and
    runs there; prompts, chosen timesteps and labels for a prompt pipeline are refused by name."""
    from tests.cli_helpers import cli

    pipe_dir, build_dir = dit_build
    code, _, err = cli("costs", "--device", "a test device", "--ratio", "fp32=1,int8=0.5", "--source", "stated for a test",
                       "--out", tmp_path / "costs.json")
    assert code == 0, err
    common = ["calibrate", build_dir, "--costs", tmp_path / "costs.json", "--pipeline", pipe_dir, "--steps", STEPS,
              "--calib-seeds", "0,1"]
    code, out, err = cli(*common, "--calib-classes", "1,7", "--speedup", "1.3", "--out", tmp_path / "s.json",
                         "--report", tmp_path / "report")
    assert code == 0, err
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["target"]["class_labels"] == [1, 7] and written["target"]["guidance_scale"] == 4.0
    assert sum(p == "int8" for p in written["precisions"]) >= 2  # 1.3x at int8 = 0.5 of fp32 needs two cheap steps
    report = json.loads((tmp_path / "report" / "calibration_report.json").read_text())
    assert report["compared"]["all-fp32"]["ssim"] == 1.0 and report["compared"]["all-int8"]["latent_error"] > 0
    assert "class labels x seeds" in report["grid"]
    code, out, err = cli("run", build_dir, "--pipeline", pipe_dir, "--class", "1,7", "--schedule", tmp_path / "s.json",
                         "--out", tmp_path / "i.png", "--json")
    assert code == 0, err
    assert [s["precision"] for s in json.loads(out)["steps"]] == written["precisions"]

    (tmp_path / "prompts.txt").write_text("a cat\n")
    code, _, err = cli(*common, "--prompts", tmp_path / "prompts.txt", "--speedup", "1.3", "--out", tmp_path / "p.json")
    assert code == 2 and "takes class labels, not prompts: pass --calib-classes" in err, err
    code, _, err = cli(*common, "--speedup", "1.3", "--out", tmp_path / "p.json")
    assert code == 2 and "--pipeline needs its samples" in err, err
    from diffusers import DPMSolverMultistepScheduler

    from tmpdiff.formats.schedule import Schedule, save_schedule

    shutil.copytree(pipe_dir, tmp_path / "dpm")  # a scheduler that takes timesteps: the pipeline's call does not
    DPMSolverMultistepScheduler().save_pretrained(tmp_path / "dpm" / "scheduler")
    save_schedule(Schedule(steps=STEPS, precisions=["fp32"] * STEPS, timesteps=[900, 600, 300, 50]), tmp_path / "t.json")
    code, _, err = cli(*common[:5], tmp_path / "dpm", *common[6:], "--calib-classes", "1", "--speedup", "1.3",
                       "--timesteps-from", tmp_path / "t.json", "--out", tmp_path / "p.json")
    assert code == 2 and "DiTPipeline takes no timesteps=" in err, err
    assert not (tmp_path / "p.json").exists()


def test_class_labels_go_to_a_pipeline_that_takes_them(dit_build, tmp_path):
    """`export --calib-classes` of a prompt pipeline's denoiser, or with --random-calibration, is refused by name (a
    class-label pipeline given prompts: `test_a_class_label_pipeline_is_benched_on_unseen_labels`)."""
    from tests.cli_helpers import cli

    root = tmp_path / "sd"
    tiny_pipelines.build("sd15").save_pretrained(root, safe_serialization=True)
    code, _, err = cli("export", root, "--subfolder", "unet", "--precisions", "fp32,int8", "--out", tmp_path / "b",
                       "--calib-classes", "1,7", "--text-len", tiny_pipelines.TEXT_LEN)
    assert code == 2 and "StableDiffusionPipeline is calibrated on prompts (--prompts)" in err, err
    code, _, err = cli("export", dit_build[0], "--subfolder", "transformer", "--precisions", "fp32,int8", "--out",
                       tmp_path / "b", "--calib-classes", "1", "--random-calibration")
    assert code == 2 and "give --calib-classes or --random-calibration, not both" in err, err
    assert not (tmp_path / "b").exists()


def test_a_first_call_at_a_timestep_the_scheduler_does_not_hold_is_refused():
    # schedulers without a step index (DDIM, DDPM, PNDM) are followed from the first call's timestep; one that is not
    # among the scheduler's timesteps used to start the schedule at step 0, every step at another step's precision
    from tmpdiff.runtime.dropin import _position

    timesteps = torch.tensor([999, 749, 500, 250])
    assert _position(timesteps, torch.tensor(500)) == 2 and _position(timesteps, None) == 0
    with pytest.raises(TmpdiffError, match="timestep 700, which is not among the scheduler's timesteps"):
        _position(timesteps, torch.tensor([700.0, 700.0]))


def test_a_class_label_pipeline_is_benched_on_unseen_labels(dit_build, tmp_path):
    """`bench --pipeline DIR --calib-classes`: DiTPipeline benched as a text-to-image pipeline is (searched on
    calibration labels x seeds, judged on unseen labels x seeds against the fp32 images, the exhaustive optimum
    through the pipeline); the options of the other kind, or of none, are refused by name."""
    from tests.cli_helpers import cli

    pipe_dir, build_dir = dit_build
    costs = tmp_path / "costs.json"
    code, _, err = cli("costs", "--device", "a test device", "--ratio", "fp32=1,int8=0.5", "--source",
                       "stated for a test", "--out", costs)
    assert code == 0, err
    common = ["bench", build_dir, "--costs", costs, "--pipeline", pipe_dir, "--steps", STEPS, "--speedups", "1.3",
              "--calib-seeds", "0", "--unseen-seeds", "5,6"]
    code, out, err = cli(*common, "--calib-classes", "1,7", "--unseen-classes", "2,3", "--out", tmp_path / "bench")
    assert code == 0, err
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert report["conditioning"] == "class labels"
    assert (report["class_labels"], report["unseen_class_labels"]) == ([1, 7], [2, 3])
    [run] = report["runs"]
    assert (run["calib_samples"], run["unseen_samples"]) == (2, 4)
    uniform = {r["method"]: r["unseen"]["latent"]["value"] for r in run["uniform"]}
    assert uniform["uniform fp32"] == 0 < uniform["uniform int8"]
    [target] = run["targets"]
    refined = next(r for r in target["rows"] if r["method"] == "TMPDiff refined (ssim)")
    assert refined["unseen"]["latent"]["value"] < uniform["uniform int8"]  # half its steps at fp32
    assert "correct" not in refined["unseen"]  # no judge ships for ImageNet-style labels
    assert run["exhaustive_unseen"]["schedules"] == 2 ** STEPS
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "2 class labels x seeds [5, 6]" in md
    made = report["build_provenance"]  # the engines it judged, and the host
    assert made["build"] == str(build_dir) and set(made["precisions"]) == {"fp32", "int8"}
    assert made["precisions"]["int8"]["calibration_captured_on"]["torch"] == torch.__version__
    assert made["host"]["device"] in md

    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    code, _, err = cli(*common, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "p")
    assert code == 2 and "takes class labels, not prompts: pass --calib-classes" in err, err
    code, _, err = cli(*common, "--out", tmp_path / "p")
    assert code == 2 and "--pipeline needs its samples" in err, err
    code, _, err = cli(*common, "--calib-classes", "1", "--unseen-prompts", tmp_path / "prompts.txt", "--out",
                       tmp_path / "p")
    assert code == 2 and "--unseen-prompts goes with --prompts" in err, err
    code, _, err = cli("bench", build_dir, "--costs", costs, "--calib-classes", "1", "--out", tmp_path / "p")
    assert code == 2 and "need --pipeline" in err, err
    assert not (tmp_path / "p").exists()
