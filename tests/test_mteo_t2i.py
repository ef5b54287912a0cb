"""MTEO on the bundled text-to-image pipeline (PixArt's adaLN-single): slots, distillation on prompts, graphs with a
time-embeddings input, and the diffusers drop-in feeding each step's learned row."""

from __future__ import annotations

import pytest
import torch

from tests.cli_helpers import cli
from tmpdiff.calibration.few_step import FewStepSampler, make_scheduler, solver_timesteps
from tmpdiff.calibration.mteo import DistillConfig
from tmpdiff.commands.distill import distill_embeddings, load_distiller
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.models.time_embeddings import EmbeddingOverride, embedding_slots, load_time_embeddings, own_embeddings
from tmpdiff.models.tiny_t2i import t2i_dir
from tmpdiff.runtime.runner import initial_noise

PROMPTS = ["a red 3 on a blue background", "a green 7 on a black background"]
STEPS = 3
TINY = DistillConfig(solver="dpmsolver++", steps=STEPS, iterations=3, batch=2, train_samples=4, validation_samples=2,
                     reference_steps=8, lr=5e-2)


@pytest.fixture(scope="module")
def distiller():
    return load_distiller("bundled-t2i")[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """An fp32 export of the bundled transformer with a time-embeddings input, built for ORT; MTEO rows distilled
    for 3 steps (a few iterations on 4 held-in prompts) and a plan naming them."""
    root = tmp_path_factory.mktemp("mteo-t2i")
    code, _, err = cli("export", "bundled-t2i", "--out", root, "--precisions", "fp32", "--time-embedding-input")
    assert code == 0, err
    build = root / "tiny-t2i"
    code, _, err = cli("build", build, "--threads", 1)
    assert code == 0, err
    embeddings = root / "plan" / "mteo.safetensors"
    embeddings.parent.mkdir()
    outcome = distill_embeddings("bundled-t2i", TINY, ["trajectory"], embeddings)
    code, _, err = cli("plan-embeddings", build, embeddings, "--out", root / "plan" / "plan.json", "--pipeline", t2i_dir())
    assert code == 0, err
    return root, build, outcome


def test_slots_are_the_blocks_then_the_output_layer(distiller):
    assert embedding_slots(distiller.model) == [f"transformer_blocks.{i}" for i in range(6)] + ["adaln_single"]


def test_own_rows_reproduce_the_plain_sampler_bit_for_bit_and_each_slot_counts(distiller):
    index, noise = torch.tensor([0, 5]), initial_noise(2, distiller.channels, distiller.image_size, 3)
    config = distiller.scheduler_config
    timesteps = solver_timesteps(make_scheduler("dpmsolver++", config), STEPS)
    sampler = FewStepSampler(distiller.model, STEPS, distiller.guidance_scale, distiller.conditioning, distiller.channels)
    with torch.no_grad():
        plain = sampler.sample_states(make_scheduler("dpmsolver++", config), index, noise)[-1]
        own = own_embeddings(distiller.model, timesteps, rows=4)  # 2 prompts x (cond, uncond)
        hooked = sampler.sample_states(make_scheduler("dpmsolver++", config), index, noise, embeddings=own)[-1]
        moved = {}
        for slot in (0, 6):  # a block's modulation, and the output layer's shift and scale
            other = own.clone()
            other[1, slot] += 0.5
            moved[slot] = sampler.sample_states(make_scheduler("dpmsolver++", config), index, noise,
                                                embeddings=other)[-1]
    assert torch.equal(hooked, plain)
    assert all((m - plain).abs().max() > 1e-3 for m in moved.values())


def test_distillation_on_prompts_lowers_the_loss_and_leaves_the_backbone(work, distiller):
    _, _, outcome = work
    record = outcome.info.runs[0]
    assert record.final < record.initial
    tensor, info = load_time_embeddings(outcome.path)
    assert info.model == "tiny-t2i" and info.guidance_scale == 4.5 and info.slots == embedding_slots(distiller.model)
    assert tensor.shape == (STEPS, 7, 128) and info.parameter_fraction < 0.01
    own = own_embeddings(distiller.model, info.timesteps)
    assert not torch.allclose(tensor, own)  # learned, not the initial value


def _pipeline_latents(build, plan, torch_rows=None):
    """Latents of the stock pipeline over PROMPTS: on the engines with `plan`, or (torch_rows given) on the torch
    transformer fed each step's row by the override."""
    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline

    if torch_rows is None:
        pipe = load_pipeline(t2i_dir())
        attach_engines(pipe, build, schedule=plan, threads=1)
        context = None
    else:
        pipe = load_pipeline(t2i_dir(), load_denoiser=True)
        context = EmbeddingOverride(pipe.transformer)
        pipe.transformer.register_forward_pre_hook(
            lambda *_: setattr(context, "row", torch_rows[pipe.scheduler.step_index or 0]))
    kwargs = call_kwargs(pipe, steps=STEPS, seed=7, guidance_scale=None, text_len=16, sample_size=8)
    with torch.no_grad():
        if context is None:
            return pipe(PROMPTS, output_type="latent", **kwargs).images
        with context:
            return pipe(PROMPTS, output_type="latent", **kwargs).images


def test_dropin_feeds_learned_rows_as_the_torch_model_takes_them(work):
    root, build, outcome = work
    rows, _ = load_time_embeddings(outcome.path)
    engines = _pipeline_latents(build, root / "plan" / "plan.json")
    torch_ref = _pipeline_latents(build, None, torch_rows=rows)
    plain = _pipeline_latents(build, ["fp32"] * STEPS)  # a plain schedule on these graphs: the own table's rows
    stock = _pipeline_latents(build, None, torch_rows=[None] * STEPS)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(engines, torch_ref) < 1e-4
    assert rel(plain, stock) < 1e-4
    assert rel(engines, plain) > 1e-2  # the learned rows change the sample


def test_rows_record_their_model_and_another_models_build_refuses_them(work, tmp_path):
    """The file records the model's content hash as the build's manifest does; rows marked as another model's are
    refused by plan-embeddings, and by run when a plan's file is swapped for them."""
    import shutil

    from tmpdiff.formats.manifest import load_manifest
    from tmpdiff.models.time_embeddings import save_time_embeddings

    root, build, outcome = work
    assert outcome.info.model_sha256 == load_manifest(build).model_sha256
    tensor, info = load_time_embeddings(outcome.path)
    other = tmp_path / "other.safetensors"
    save_time_embeddings(other, tensor, info.model_copy(update={"model_sha256": "0" * 64}))
    code, _, err = cli("plan-embeddings", build, other, "--out", tmp_path / "plan.json", "--pipeline", t2i_dir())
    assert code == 2 and f"{other}: learned on another model (tiny-t2i" in err and not (tmp_path / "plan.json").exists()
    shutil.copy(root / "plan" / "plan.json", tmp_path / "plan.json")
    shutil.copy(other, tmp_path / "mteo.safetensors")  # the name the plan gives its rows
    code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--schedule", tmp_path / "plan.json",
                       "--out", tmp_path / "x.png")
    assert code == 2 and "learned on another model" in err and not (tmp_path / "x.png").exists(), err


def test_learned_rows_are_refused_where_they_do_not_fit(work, tmp_path):
    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline

    root, build, _ = work
    plan = root / "plan" / "plan.json"
    with pytest.raises(TmpdiffError, match="learned at guidance scale 4.5, the run uses 2"):
        attach_engines(load_pipeline(t2i_dir()), build, schedule=plan, guidance_scale=2.0)
    with pytest.raises(TmpdiffError, match="do not feed learned time conditioning"):
        attach_engines(load_pipeline(t2i_dir()), build, schedule=plan, parallel=2)
    # timestep shifts need a timestep input (the own table has rows at integer timesteps only)
    shifts = root / "plan" / "shift.safetensors"
    distill_embeddings("bundled-t2i", DistillConfig(**{**TINY.__dict__, "kind": "timestep-shift", "iterations": 1}),
                       ["trajectory"], shifts)
    code, _, err = cli("plan-embeddings", build, shifts, "--out", root / "plan" / "p3.json", "--pipeline", t2i_dir())
    assert code == 2 and "holds timestep shifts" in err and "without --time-embedding-input" in err, err
    code, _, err = cli("plan-embeddings", build, root / "plan" / "mteo.safetensors", "--out", root / "plan" / "p2.json")
    assert code == 2 and "text-to-image build: pass --pipeline DIR" in err, err
    code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--schedule", plan,
                       "--steps", STEPS + 1, "--out", tmp_path / "x.png")
    assert code == 2 and "schedule has 3 steps but --steps 4" in err, err
    pipe = load_pipeline(t2i_dir())  # same scheduler class, other spacing: other timesteps, refused at the first call
    pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "timestep_spacing": "leading"})
    attach_engines(pipe, build, schedule=plan, threads=1)
    with pytest.raises(TmpdiffError, match="learned for timesteps .* the run samples at"):
        pipe(PROMPTS[:1], output_type="latent", **call_kwargs(pipe, steps=STEPS, seed=0, guidance_scale=None,
                                                               text_len=16, sample_size=8))


def test_the_dropin_checks_each_calls_guidance_against_the_rows(work, monkeypatch):
    """Attached at the pipeline's default (4.5, the rows'), a later call at another scale is refused at its first
    denoiser call, naming both; where the pipeline exposes no scale, a batch without guidance's copy is refused."""
    from tmpdiff.runtime import dropin
    from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline

    root, build, _ = work
    pipe = load_pipeline(t2i_dir())
    denoiser = dropin.attach_engines(pipe, build, schedule=root / "plan" / "plan.json", threads=1)

    def call(scale):
        with torch.no_grad():
            return pipe(PROMPTS, output_type="latent", **call_kwargs(pipe, steps=STEPS, seed=0, guidance_scale=scale,
                                                                    text_len=16, sample_size=8)).images

    want = call(4.5)
    for scale in (9.0, 1.0):
        with pytest.raises(TmpdiffError, match=f"learned at guidance scale 4.5, the run uses {scale}$") as err:
            call(scale)
        assert "mteo.safetensors" in str(err.value) and "\n" not in str(err.value)
        assert denoiser.trace.steps == []  # refused before any engine ran
    assert torch.equal(call(4.5), want)  # a refused call leaves the pipeline usable
    monkeypatch.setattr(dropin, "running_guidance", lambda pipe, arguments: None)  # a pipeline that exposes nothing
    with pytest.raises(TmpdiffError, match="learned with classifier-free guidance at scale 4.5, the pipeline call runs "
                                           "without it"):
        call(1.0)
    assert torch.equal(call(4.5), want)


def test_the_running_calls_guidance_and_cfg_batch_are_read():
    from tmpdiff.runtime.dropin import guided_batch, running_call, running_guidance

    class SetsIt:  # SD3, SDXL, Flux: the scale kept on the pipeline before the loop
        def __call__(self, scale):
            self._guidance_scale = scale
            return denoise(self)

    class KeepsIt:  # PixArt, DiT: the call's argument only
        def __call__(self, prompt, guidance_scale=4.5):
            return denoise(self)

    class Neither:
        def __call__(self, prompt):
            return denoise(self)

    def denoise(pipe, pipes=None):
        found = running_call([pipe] if pipes is None else pipes)
        return None if found is None else running_guidance(*found)

    assert SetsIt()(7.0) == 7.0 and KeepsIt()("a", guidance_scale=2) == 2.0 and KeepsIt()("a") == 4.5
    assert Neither()("a") is None and running_call([KeepsIt()]) is None
    x = torch.randn(2, 4, 8, 8)
    assert guided_batch(torch.cat([x] * 2)) and guided_batch(torch.cat([x[:1]] * 3))
    assert not guided_batch(x) and not guided_batch(x[:1]) and not guided_batch(torch.cat([x, x[:1]]))


def test_quantization_aware_rows_train_through_the_pipelines_fake_quant_model(distiller):
    """Fake-quant models calibrated on the pipeline's captured calls: an int8 step changes the sample, and the loss
    reaches the rows of every step through it."""
    from tmpdiff.calibration.mteo_quant import differentiable_attention, fake_quant_models, step_models
    from tmpdiff.models.registry import adapter_for_config
    from tmpdiff.runtime.capture import PipelineCapture, prompted_calibration

    adapter = adapter_for_config({**dict(distiller.model.config), "text_len": 16})
    calibration = prompted_calibration(distiller.model, adapter, PipelineCapture(t2i_dir(), PROMPTS, [0], 2, None))
    models = fake_quant_models(distiller.model, None, ["fp32", "int8"], calibration=(adapter, calibration))
    assert models["fp32"] is distiller.model and models["int8"] is not distiller.model
    config = distiller.scheduler_config
    timesteps = solver_timesteps(make_scheduler("dpmsolver++", config), 2)
    sampler = FewStepSampler(step_models(["int8", "int8"], models), 2, distiller.guidance_scale, distiller.conditioning,
                             distiller.channels)
    index, noise = torch.tensor([1]), initial_noise(1, distiller.channels, distiller.image_size, 7)
    table = own_embeddings(distiller.model, timesteps).requires_grad_(True)
    with torch.no_grad():
        fp32 = FewStepSampler(distiller.model, 2, distiller.guidance_scale, distiller.conditioning,
                              distiller.channels).sample_states(make_scheduler("dpmsolver++", config), index, noise,
                                                                embeddings=table)[-1]
    with differentiable_attention():
        out = sampler.sample_states(make_scheduler("dpmsolver++", config), index, noise, embeddings=table)[-1]
    assert not torch.allclose(out, fp32, atol=1e-5)
    out.pow(2).mean().backward()
    assert table.grad[1].abs().sum() > 0


def test_a_ddim_plan_runs_in_the_pipeline_with_its_own_scheduler(work, tmp_path):
    """`run --pipeline` samples an MTEO plan with the solver its rows were learned for (DDIM, 'trailing'), not the
    pipeline's DPM-Solver++; the trace shows the plan's timesteps."""
    import json

    root, build, _ = work
    folder = root / "ddim-plan"
    folder.mkdir()
    cfg = DistillConfig(**{**TINY.__dict__, "solver": "ddim", "iterations": 1})
    outcome = distill_embeddings("bundled-t2i", cfg, ["trajectory"], folder / "rows.safetensors")
    code, _, err = cli("plan-embeddings", build, folder / "rows.safetensors", "--out", folder / "plan.json",
                       "--pipeline", t2i_dir())
    assert code == 0, err
    code, out, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--schedule",
                         folder / "plan.json", "--out", tmp_path / "x.png", "--json")
    assert code == 0, err
    assert [step["timestep"] for step in json.loads(out)["steps"]] == outcome.info.timesteps


def test_ddim_leaves_a_latent_models_x0_unclipped(distiller):
    """DDIM's own default clips x0 to [-1, 1]; `make_scheduler` keeps the model's setting (none here), without which
    plain 8-step DDIM lands far from the 20-step DPM-Solver++ sample."""
    import diffusers

    config = distiller.scheduler_config
    index, noise = torch.tensor([0, 3]), initial_noise(2, distiller.channels, distiller.image_size, 11)
    sampler = FewStepSampler(distiller.model, 8, distiller.guidance_scale, distiller.conditioning, distiller.channels)
    reference = FewStepSampler(distiller.model, 20, distiller.guidance_scale, distiller.conditioning,
                               distiller.channels)
    clipped = diffusers.DDIMScheduler.from_config({**make_scheduler("ddim", config).config, "clip_sample": True})
    with torch.no_grad():
        want = reference.sample_states(make_scheduler("dpmsolver++", config), index, noise)[-1]
        ours = sampler.sample_states(make_scheduler("ddim", config), index, noise)[-1]
        theirs = sampler.sample_states(clipped, index, noise)[-1]
    assert not make_scheduler("ddim", config).config.clip_sample
    assert (ours - want).norm() < 0.5 * (theirs - want).norm()
