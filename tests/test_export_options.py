"""`tmpdiff export`'s calibration and graph-size options: a value that cannot work, or an option that cannot apply,
is refused by name before any model loads and with nothing written (a review's findings); what applies is used."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from tests.test_safety import refused
from tmpdiff.commands.check import check_build
from tmpdiff.commands.export import calibration_for, resolve_model_dir
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import load_manifest, save_manifest
from tmpdiff.models.bundled import sampling_info
from tmpdiff.models.loading import read_model_config
from tmpdiff.models.registry import adapter_for_config


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red 3 on a blue background\n")
    return path


@pytest.fixture
def t2i_transformer():
    return resolve_model_dir("bundled-t2i", None)


def test_calib_guidance_must_be_finite(tmp_path, bundled, prompts, t2i_transformer):
    """inf failed late inside modelopt; nan silently turned classifier-free guidance off (recorded as null)."""
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(TmpdiffError, match=f"--calib-guidance must be a finite number, got {value}"):
            calibration_for(t2i_transformer, [0], None, prompts=prompts, guidance=value)
        with pytest.raises(TmpdiffError, match="--calib-guidance must be a finite number"):
            calibration_for(bundled.transformer_dir, [0], None, guidance=value)
    out = tmp_path / "out"
    for value in ("nan", "inf"):
        refused(("export", "bundled-t2i", "--prompts", prompts, "--calib-guidance", value, "--precisions", "int8",
                 "--out", out), "--calib-guidance", value)
    assert not out.exists()


def test_calib_steps_beyond_the_schedulers_training_timesteps(tmp_path, bundled, prompts, t2i_transformer):
    """5000 steps of a 1000-timestep scheduler crashed inside diffusers after the pipeline had loaded."""
    with pytest.raises(TmpdiffError, match="--calib-steps 5000: 5000 steps, but the scheduler has 1000 training"):
        calibration_for(t2i_transformer, [0], None, prompts=prompts, steps=5000)
    with pytest.raises(TmpdiffError, match="--calib-steps 5000: .* 1000 training timesteps"):
        calibration_for(bundled.transformer_dir, [0], None, steps=5000)
    with pytest.raises(TmpdiffError, match=r"--calib-steps 1000000: .*1\.\.10000"):
        calibration_for(t2i_transformer, [0], None, prompts=prompts, steps=10**6)
    out = tmp_path / "out"
    refused(("export", "bundled-t2i", "--prompts", prompts, "--calib-steps", 5000, "--precisions", "int8", "--out", out),
            "--calib-steps 5000", "1000 training timesteps")
    assert not out.exists()


def test_calib_steps_and_guidance_reach_class_conditional_sampling(bundled, torch_dit, prompts, t2i_transformer):
    """They were ignored for a class-conditional model (and with --random-calibration, which samples nothing)."""
    recipe, _ = calibration_for(bundled.transformer_dir, [0], [3], steps=3, guidance=1.0)
    assert (recipe.description["steps"], recipe.description["guidance_scale"]) == (3, 1.0)
    default, _ = calibration_for(bundled.transformer_dir, [0], [3])
    assert (default.description["steps"], default.description["guidance_scale"]) == (20, 2.0)  # another export key
    captured = recipe.capture(torch_dit, adapter_for_config(read_model_config(bundled.transformer_dir)))
    # 3 steps, one row each: guidance 1 makes no unconditional rows
    assert [tuple(b["hidden_states"].shape) for b in captured.batches] == [(1, 1, 16, 16)] * 3
    for model_dir in (bundled.transformer_dir, t2i_transformer):
        for given in ({"steps": 4}, {"guidance": 3.0}):
            with pytest.raises(TmpdiffError, match="--random-calibration samples no runs for --calib-"):
                calibration_for(model_dir, [0], None, random=True, **given)
    with pytest.raises(TmpdiffError, match="--calib-steps set the runs .* this export captures none"):
        calibration_for(t2i_transformer, [0], None, steps=4, needed=False)  # fp32 alone: nothing is captured
    refused(("export", "bundled", "--random-calibration", "--calib-guidance", 3, "--precisions", "int8", "--out",
             "unused"), "--random-calibration", "--calib-guidance")


def test_a_sample_size_other_than_the_models_sampling_size(tmp_path, bundled, fp32_build):
    """--sample-size 8 of the 16x16 class-conditional model passed export and check, then failed in run."""
    out = tmp_path / "out"
    refused(("export", bundled.transformer_dir, "--out", out, "--precisions", "fp32", "--sample-size", 8),
            "--sample-size 8", "image_size 16")
    assert not out.exists()
    copy = tmp_path / "b"  # a build whose graphs take 16x16 latents, recorded as sampling 8x8 ones
    shutil.copytree(fp32_build, copy)
    manifest = load_manifest(copy)
    manifest.sampling = sampling_info(bundled).model_copy(update={"image_size": 8})
    save_manifest(copy, manifest)
    problems = [str(p) for p in check_build(copy, spot_check=False)]
    assert any("manifest's inputs take hidden_states of ('batch', 1, 16, 16)" in p and "image_size 8" in p
               for p in problems), problems
    assert any("fp32: the graph takes hidden_states of ('batch', 1, 16, 16)" in p for p in problems), problems
    assert check_build(fp32_build, spot_check=False) == []


MISSING = object()


@pytest.mark.parametrize("value", [-4, 0, 1.5, None, True, "16", MISSING])
def test_a_config_sample_size_no_graph_can_take(tmp_path, bundled, value):
    """-4: a negative dimension; 0 and 1.5: a division by zero; null: a TypeError - tracebacks, now refusals."""
    model = tmp_path / "model"
    shutil.copytree(bundled.transformer_dir, model)
    config = json.loads((model / "config.json").read_text())
    if value is MISSING:
        del config["sample_size"]
    else:
        config["sample_size"] = value
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    refused(("export", model, "--out", out, "--precisions", "fp32"), str(model / "config.json"),
            "sample_size must be a positive integer")
    assert not out.exists()


def test_graph_sizes_the_patch_size_or_text_length_cannot_take(tmp_path, bundled):
    out = tmp_path / "out"
    refused(("export", bundled.transformer_dir, "--out", out, "--precisions", "fp32", "--sample-size", 1),
            "--sample-size 1", "not a multiple of the patch size 2")
    pipeline = tmp_path / "t2i"
    shutil.copytree(resolve_model_dir("bundled-t2i", None).parent, pipeline)
    config_path = pipeline / "transformer" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"sample_size": 9}))
    refused(("export", pipeline, "--subfolder", "transformer", "--out", out, "--precisions", "fp32"),
            str(config_path), "sample_size 9 is not a multiple of the patch size 2")
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"sample_size": 8, "text_len": 0}))
    refused(("export", pipeline, "--subfolder", "transformer", "--out", out, "--precisions", "fp32"),
            str(config_path), "text_len must be a positive integer")
    assert not out.exists()


def test_keeping_every_layer_in_high_precision_is_refused_before_any_export(tmp_path, bundled):
    """modelopt failed with a RuntimeError after calibration (and after the fp32 graph was written)."""
    from tmpdiff.export.quantize import build_config, quantize
    from tmpdiff.formats.precisions import get_precision

    out = tmp_path / "out"
    refused(("export", bundled.transformer_dir, "--out", out, "--precisions", "fp32,int8", "--keep-high-precision", "*",
             "--calib-classes", "0", "--calib-seeds", "0"), "--keep-high-precision", "every quantizable layer")
    assert not out.exists()
    # patterns the headers cannot tell apart from the modules (an embedding table left over): modelopt's refusal
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    config = build_config(get_precision("int8"), model, ("0*",))
    with pytest.raises(TmpdiffError, match="--keep-high-precision"):
        quantize(model, config, [{"x": torch.randn(2, 16)}], lambda m, batch: m(batch["x"]))


def test_a_16_bit_load_is_recorded_as_the_calibrations_model(bundled):
    """`--load-dtype float16` exports were recorded as calibrated on "sampled trajectories, fp32 torch"."""
    from tmpdiff.export.half_convolutions import fp32_compute
    from tmpdiff.models.loading import load_diffusers_model
    from tmpdiff.runtime.capture import PipelineCapture, sampled_recipe

    model = load_diffusers_model(bundled.transformer_dir, dtype=torch.float16)
    recipe = sampled_recipe(sampling_info(bundled), [1], [0], steps=2)
    with fp32_compute():
        captured = recipe.capture(model, adapter_for_config(read_model_config(bundled.transformer_dir)))
    assert captured.description["source"] == "sampled trajectories, fp16 torch"
    assert captured.description["captured_on"]["kernels"] == torch.backends.cpu.get_cpu_capability()
    from tmpdiff.runtime.capture import torch_label

    capture = PipelineCapture(resolve_model_dir("bundled-t2i", None).parent, ["a"], [0], 2, None)
    assert capture.source(torch_label(model)) == "pipeline prompts, fp16 torch"
