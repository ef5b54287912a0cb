"""MTEO time embeddings: the hook is exact at initialisation, distillation learns, only the table changes, files."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli_helpers import cli
from tmpdiff.calibration.few_step import ClassConditioning, FewStepSampler, make_scheduler, solver_timesteps
from tmpdiff.calibration.mteo import DistillConfig, Distiller
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.time_embeddings import TimeEmbeddingsInfo
from tmpdiff.models.bundled import sampling_info
from tmpdiff.models.time_embeddings import embedding_slots, load_time_embeddings, own_embeddings, save_time_embeddings
from tmpdiff.runtime.runner import initial_noise

TINY = DistillConfig(solver="dpmsolver++", steps=2, iterations=3, batch=2, train_samples=4, validation_samples=2,
                     reference_steps=6, lr=1e-2)


@pytest.fixture(scope="module")
def setting(bundled):
    from tmpdiff.models.loading import load_diffusers_model

    model = load_diffusers_model(bundled.transformer_dir)  # its own copy: the distiller freezes its parameters
    s = sampling_info(bundled)
    distiller = Distiller(model, dict(s.scheduler_config), s.guidance_scale, ClassConditioning(s.num_classes, s.null_class),
                          s.channels, s.image_size)
    return distiller, s


@pytest.fixture(scope="module")
def tiny_run(setting):
    distiller, _ = setting
    before = {k: v.clone() for k, v in distiller.model.state_dict().items()}
    data = distiller.data(TINY)
    return distiller, data, before, distiller.distill(TINY, "trajectory", data)


def test_slots_are_the_blocks_then_the_output_layer(setting):
    slots = embedding_slots(setting[0].model)
    assert slots == [f"transformer_blocks.{i}.norm1.emb.timestep_embedder" for i in range(4)] + \
        ["transformer_blocks.0.norm1.emb.timestep_embedder#2"]


@pytest.mark.parametrize("solver", ["dpmsolver++", "ddim"])
def test_own_embeddings_reproduce_the_plain_sampler_bit_for_bit(setting, solver):
    from tmpdiff.engines.torch_engine import TorchEngine
    from tmpdiff.models.dit import DiTAdapter
    from tmpdiff.runtime.runner import ScheduledRunner

    distiller, s = setting
    labels, noise = torch.tensor([3, 8]), initial_noise(2, s.channels, s.image_size, 5)
    config = dict(s.scheduler_config)
    timesteps = solver_timesteps(make_scheduler(solver, config), 3)
    sampler = FewStepSampler(distiller.model, 3, s.guidance_scale, distiller.conditioning, s.channels)
    with torch.no_grad():
        own = own_embeddings(distiller.model, timesteps, rows=4)  # the sampler's rows: 2 samples x (cond, uncond)
        hooked = sampler.sample_states(make_scheduler(solver, config), labels, noise, embeddings=own)[-1]
        other = own.clone()
        other[1, 2] += 0.5  # one slot of one step changed: the output must move
        moved = sampler.sample_states(make_scheduler(solver, config), labels, noise, embeddings=other)[-1]
    runner = ScheduledRunner({"fp32": TorchEngine.for_model(distiller.model, DiTAdapter(dict(distiller.model.config)))},
                             2, s.channels, s.image_size, s.guidance_scale, s.null_class, s.num_classes)
    plain = runner.sample(make_scheduler(solver, config), labels, noise, ["fp32"] * 3).latents
    assert torch.equal(hooked, plain)
    assert (moved - plain).abs().max() > 1e-3


def test_distillation_lowers_the_loss_and_changes_only_the_table(tiny_run):
    distiller, _, before, result = tiny_run
    assert result.record.final < result.record.initial
    after = distiller.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in distiller.model.parameters())
    initial = distiller.initial(TINY)
    assert result.tensor.shape == initial.shape == (2, 5, 192)
    assert not torch.equal(result.tensor, initial)


def test_distillation_is_deterministic_and_the_shift_baseline_learns(tiny_run):
    distiller, data, _, result = tiny_run
    again = distiller.distill(TINY, "trajectory", data)
    assert torch.equal(again.tensor, result.tensor)
    shift = DistillConfig(**{**TINY.__dict__, "kind": "timestep-shift", "lr": 2.0})
    shifted = distiller.distill(shift, "final", data)
    assert shifted.tensor.shape == (2,) and shifted.tensor.abs().max() > 0
    assert shifted.record.final < shifted.record.initial


def _info(tensor: torch.Tensor) -> TimeEmbeddingsInfo:
    return TimeEmbeddingsInfo(kind="mteo", model="tiny-dit", model_parameters=3095620, solver="dpmsolver++", steps=2,
                              timesteps=[999, 500], slots=[f"s{i}" for i in range(5)], dim=192,
                              trained_parameters=tensor.numel(), guidance_scale=2.0, reference_steps=8, train_seed=1000,
                              train_samples=4, validation_seed=2000, iterations=4, loss="trajectory")


def test_the_file_round_trips_and_bad_files_are_named(tmp_path):
    from safetensors.torch import save_file

    tensor = torch.randn(2, 5, 192, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "e.safetensors"
    save_time_embeddings(path, tensor, _info(tensor))
    loaded, info = load_time_embeddings(path)
    assert torch.equal(loaded, tensor) and info == _info(tensor)
    assert info.parameter_fraction < 0.01

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    bare = tmp_path / "bare.safetensors"
    save_file({"embeddings": tensor.contiguous()}, str(bare))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"embeddings": tensor[:1].contiguous()}, str(wrong), metadata={"tmpdiff": _info(tensor).model_dump_json()})
    nan = tmp_path / "nan.safetensors"
    save_file({"embeddings": torch.full_like(tensor, float("nan"))}, str(nan),
              metadata={"tmpdiff": json.dumps(_info(tensor).model_dump())})
    deep = tmp_path / "deep.safetensors"  # a RecursionError inside json before
    save_file({"embeddings": tensor.contiguous()}, str(deep), metadata={"tmpdiff": "[" * 100_000 + "]" * 100_000})
    for bad, words in [(garbage, "safetensors"), (bare, "metadata"), (wrong, "expected"), (nan, "NaN"),
                       (deep, "nested too deeply"), (tmp_path / "missing.safetensors", "missing")]:
        with pytest.raises(TmpdiffError, match=words) as err:
            load_time_embeddings(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_the_command_writes_a_loadable_file_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "mteo3.safetensors"
    args = ["distill-embeddings", "bundled", "--steps", "2", "--out", out, "--iterations", "1", "--batch", "2",
            "--train-samples", "2", "--reference-steps", "4", "--loss", "final"]
    code, stdout, err = cli(*args)
    assert code == 0, err
    tensor, info = load_time_embeddings(out)
    assert info.steps == 2 and tensor.shape == (2, 5, 192) and info.loss == "final"
    assert "of the model's 3,095,620" in stdout
    code, _, err = cli(*args)
    assert code == 2 and "exists" in err


def test_quantization_aware_steps_pass_gradients_and_keep_their_forward(setting):
    from tmpdiff.calibration.mteo_quant import differentiable_attention, fake_quant_models, step_models

    distiller, s = setting
    models = fake_quant_models(distiller.model, s, ["fp32", "int8"], seeds=(0,), steps=1)
    assert models["fp32"] is distiller.model and models["int8"] is not distiller.model
    config = dict(s.scheduler_config)
    timesteps = solver_timesteps(make_scheduler("dpmsolver++", config), 2)
    sampler = FewStepSampler(step_models(["fp32", "int8"], models), 2, s.guidance_scale, distiller.conditioning, s.channels)
    labels, noise = torch.tensor([1]), initial_noise(1, s.channels, s.image_size, 7)
    table = own_embeddings(distiller.model, timesteps).requires_grad_(True)
    with torch.no_grad():
        fp32 = FewStepSampler(distiller.model, 2, s.guidance_scale, distiller.conditioning, s.channels).sample_states(
            make_scheduler("dpmsolver++", config), labels, noise, embeddings=table)[-1]
        plain = sampler.sample_states(make_scheduler("dpmsolver++", config), labels, noise, embeddings=table)[-1]
    with differentiable_attention():
        out = sampler.sample_states(make_scheduler("dpmsolver++", config), labels, noise, embeddings=table)[-1]
    assert torch.equal(out, plain) and not torch.equal(out, fp32)  # the int8 step changes the sample
    out.pow(2).mean().backward()
    # the int8 step passes gradients (step 0 at t = 999 may get none here: thresholding clips most of its x0)
    assert table.grad[1].abs().sum() > 0
    with pytest.raises(TmpdiffError, match="fp8"):
        step_models(["fp8", "int8"], models)


def test_the_command_writes_the_trained_table_only_where_it_beats_the_models_own(setting, tmp_path):
    """The held-out set judges the initial rows (plain sampling) too: a run that beats them is written, else the
    model's own rows are, and the record says which."""
    from tmpdiff.commands.distill import distill_embeddings

    distiller, _ = setting
    initial = distiller.initial(TINY)
    for name, cfg, kept in [("bad", DistillConfig(**{**TINY.__dict__, "iterations": 2, "lr": 10.0}), "initial"),
                            ("good", TINY, "learned")]:
        out = tmp_path / f"{name}.safetensors"
        distill_embeddings("bundled", cfg, ["trajectory", "final"], out)
        tensor, info = load_time_embeddings(out)
        best = min(run.validation_mse for run in info.runs)
        assert torch.equal(tensor, initial) == (kept == "initial"), name
        assert info.kept == kept and (best < info.initial_validation_mse) == (kept == "learned"), name
    code, stdout, err = cli("distill-embeddings", "bundled", "--steps", "2", "--out", tmp_path / "c.safetensors",
                            "--iterations", "0", "--batch", "2", "--train-samples", "2", "--reference-steps", "6",
                            "--loss", "final")
    assert code == 0, err
    assert "no run beat it: wrote the model's own embeddings" in stdout and "(kept)" not in stdout
