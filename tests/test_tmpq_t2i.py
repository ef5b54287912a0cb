"""TMPQ-DM on the text-to-image pipeline: per-layer costs of a pipeline build, the joint search with candidates
sampled inside the stock pipeline (judged on other prompts and seeds), and a mixed plan deployed and run through the
diffusers drop-in, compared with the super-network it was searched on."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.cli_helpers import cli
from tmpdiff.formats.manifest import load_manifest, mixed_name
from tmpdiff.formats.schedule import Schedule, SchedulerRef
from tmpdiff.formats.tmpq_plan import TmpqPlan, load_tmpq_plan, save_tmpq_plan
from tmpdiff.models.tiny_t2i import t2i_dir

TIMESTEPS = [999, 640, 300, 40]
PROMPT = "a blue 5 on a yellow background"


@pytest.fixture(scope="module")
def t2i_tmpq(t2i_int8_build, tmp_path_factory):
    """A copy of the fp32 + int8 pipeline build, its per-layer costs table and prompt files."""
    _, source, calib = t2i_int8_build
    root = tmp_path_factory.mktemp("tmpq-t2i")
    build = root / "tiny-t2i"
    shutil.copytree(source, build)
    costs = root / "layer_costs.json"
    code, _, err = cli("layer-costs", build, "--model", "bundled-t2i", "--out", costs, "--batch", 4, "--warmup", 1,
                       "--repeats", 3, "--threads", 1)
    assert code == 0, err
    held_out = root / "held_out.txt"
    held_out.write_text("a yellow 1 on a green background\na white 0 on a red background\n")
    return root, build, costs, calib, held_out


def test_search_samples_candidates_inside_the_pipeline_and_judges_on_other_prompts(t2i_tmpq):
    root, build, costs, calib, held_out = t2i_tmpq
    plan_path = root / "plan.json"
    code, out, err = cli("search-plan", build, "--model", "bundled-t2i", "--layer-costs", costs, "--steps", 4,
                         "--reference-steps", 6, "--speedup", 1.6, "--generations", 1, "--population", 4,
                         "--prompts", calib, "--holdout-prompts", held_out, "--calib-seeds", 0, "--holdout-seeds", 0,
                         "--out", plan_path)
    assert code == 0, err
    plan = load_tmpq_plan(plan_path)
    assert plan.model_id == "tiny-t2i" and plan.steps == 4 and plan.scheduler.class_name == "DPMSolverMultistepScheduler"
    from tmpdiff.formats.manifest import load_manifest

    manifest = load_manifest(build)  # the build it was searched on: its model and the quantizers of what it searched
    assert plan.format == "tmpdiff.tmpq-plan/2" and plan.model_sha256 == manifest.model_sha256
    assert plan.export_keys and all(manifest.precisions[p].key == key for p, key in plan.export_keys.items())
    assert plan.predicted["ms"] <= plan.predicted["budget_ms"] and plan.search["evaluations"] >= 1
    # memory: each distinct configuration is one engine; int8 layers hold a quarter of fp32's weight bytes
    weights = plan.predicted["engine_weight_bytes"]
    assert len(weights) == len(plan.configs) and "engine weights in memory" in out
    for i, config in enumerate(plan.configs):
        assert weights[f"config{i}"] < plan.predicted["fp32_weight_bytes"] or set(config) == {"fp32"}
    measured = plan.measured
    assert measured["calibration"]["prompts"] == [line for line in calib.read_text().splitlines()
                                                  if line and not line.startswith("#")]
    assert measured["holdout"]["prompts"] == held_out.read_text().splitlines() and measured["holdout"]["seeds"] == [0]
    # the scale it sampled with, the pipeline's default included (was: none, so any scale ran the plan)
    assert measured["calibration"]["guidance_scale"] == measured["holdout"]["guidance_scale"] == 4.5
    results = measured["holdout"]["results"]
    reference = results["fp32 6 steps (reference)"]
    assert reference["ssim"] == 1.0 and reference["latent_error"] == 0.0
    judged = results["plan (timesteps + per-layer precision)"]
    # the pipeline ships an attribute classifier: adherence and confidence are judged, not NaN
    assert 0.0 <= judged["accuracy"] <= 1.0 and 0.0 < judged["confidence"] <= 1.0 and 0.0 < judged["ssim"] < 1.0
    assert "fp32 at the plan's 4 timesteps" in results and "int8 4 steps (scheduler spacing)" in results


def test_pipeline_options_go_together(t2i_tmpq):
    root, build, costs, calib, _ = t2i_tmpq
    code, _, err = cli("search-plan", build, "--model", str(t2i_dir()), "--layer-costs", costs, "--prompts", calib,
                       "--out", root / "unused.json")
    assert code == 2 and "--pipeline needs --prompts (searched on) and --holdout-prompts" in err
    code, _, err = cli("search-plan", build, "--model", "bundled", "--layer-costs", costs, "--prompts", calib,
                       "--out", root / "unused.json")
    assert code == 2 and "are for text-to-image builds (--pipeline)" in err
    more = root / "calibration_and_more.txt"  # the calibration prompts and one more, with the calibration seed
    more.write_text(calib.read_text() + "a yellow 1 on a green background\n")
    code, _, err = cli("search-plan", build, "--model", "bundled-t2i", "--layer-costs", costs, "--prompts", calib,
                       "--holdout-prompts", more, "--calib-seeds", 0, "--holdout-seeds", "0,1", "--out", root / "unused.json")
    assert code == 2 and "seed 0 is both a calibration and a held-out seed and prompt 'a red 3 on a blue" in err
    other = root / "other_layer_costs.json"
    other.write_text(json.dumps(json.loads(costs.read_text()) | {"model_id": "tiny-dit"}))
    code, _, err = cli("search-plan", build, "--model", "bundled-t2i", "--layer-costs", other, "--out", root / "unused.json")
    assert code == 2 and f"{other}: the layer costs were measured for model 'tiny-dit', this build is 'tiny-t2i'" in err
    assert not (root / "unused.json").exists()


@pytest.fixture(scope="module")
def mixed_deployment(t2i_tmpq):
    """A 4-step plan (one mixed fp32/int8 configuration, one uniform int8) deployed to the pipeline build."""
    from tmpdiff.commands.search_plan import denoiser_dir
    from tmpdiff.export.supernet import supernet_from_build

    root, build, _, _, _ = t2i_tmpq
    supernet = supernet_from_build(build, denoiser_dir("bundled-t2i"), ["int8"])
    mixed = ["fp32" if i % 2 else "int8" for i in range(len(supernet.layers))]
    scheduler = json.loads((t2i_dir() / "scheduler" / "scheduler_config.json").read_text())
    plan = TmpqPlan(model_id="tiny-t2i", steps=4, timesteps=TIMESTEPS, layers=list(supernet.layers),
                    scheduler=SchedulerRef(class_name=scheduler.pop("_class_name"), config=scheduler),
                    configs=[mixed, ["int8"] * len(mixed)], step_configs=[0, 1, 1, 0])
    path = root / "mixed-plan.json"
    save_tmpq_plan(plan, path)
    code, out, err = cli("deploy-plan", build, path)  # without --model: the bundled pipeline, known by its hash
    assert code == 0, err
    return build, path, plan, supernet, out


def test_a_mixed_plan_runs_through_the_drop_in_as_the_super_network_sampled_it(mixed_deployment):
    from tmpdiff.calibration.tmpq_pipeline import PipelinePlanEvaluator
    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline

    build, path, plan, supernet, out = mixed_deployment
    name = mixed_name(plan.layers, plan.configs[0])
    assert f"{name}\tdeployed" in out and "int8\tuniform" in out and name in load_manifest(build).mixed
    assert cli("check", build, "--schedule", path)[0] == 0
    # fp32 / int8 only: ONNX Runtime runs its fp16 TensorRT graph, parity-checked against the super-network
    entry = load_manifest(build).mixed[name]
    assert entry.trt_parity_error is not None and entry.trt_parity_error < 5e-2
    assert entry.census["weight_quantized"] == entry.census["input_quantized"] == entry.precisions.count("int8")

    pipe = load_pipeline(t2i_dir())

    def drop_in(schedule) -> tuple[torch.Tensor, object]:
        denoiser = attach_engines(pipe, build, schedule=schedule)
        kwargs = call_kwargs(pipe, steps=4, seed=3, guidance_scale=1.0, text_len=denoiser.adapter.text_len,
                             sample_size=denoiser.config.get("sample_size"))
        latents = pipe([PROMPT], output_type="latent", timesteps=denoiser.timesteps, **kwargs).images.float()
        return latents, denoiser

    got, denoiser = drop_in(path)
    assert denoiser.timesteps == TIMESTEPS
    assert [e.precision for e in denoiser.trace.steps] == [name, "int8", "int8", name]
    assert [e.timestep for e in denoiser.trace.steps] == TIMESTEPS

    # the same plan on the super-network in torch, inside the same pipeline (what the search evaluates); the int8
    # engines differ from modelopt's fake quant by rounding, so the bound is what uniform int8 engines show
    evaluator = PipelinePlanEvaluator(pipe, load_manifest(build), supernet, [PROMPT], [3], 4, 1.0, None)
    want = evaluator.sample(plan.step_precisions(), TIMESTEPS)
    int8_got, _ = drop_in(Schedule(steps=4, timesteps=TIMESTEPS, precisions=["int8"] * 4))
    int8_want = evaluator.sample([plan.configs[1]] * 4, TIMESTEPS)
    engines_vs_torch = float((int8_got - int8_want).norm() / int8_want.norm())
    error = float((got - want).norm() / want.norm())
    assert error < max(2 * engines_vs_torch, 1e-3) and error < 5e-2, (error, engines_vs_torch)
    # fp32 steps at the plan's timesteps: the engines reproduce the torch model
    fp32_got, _ = drop_in(Schedule(steps=4, timesteps=TIMESTEPS, precisions=["fp32"] * 4))
    fp32_want = evaluator.sample([supernet.uniform("fp32")] * 4, TIMESTEPS)
    assert (fp32_got - fp32_want).norm() / fp32_want.norm() < 1e-4


def test_run_pipeline_executes_the_mixed_plan(mixed_deployment, tmp_path):
    build, path, plan, _, _ = mixed_deployment
    name = mixed_name(plan.layers, plan.configs[0])
    code, out, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPT, "--schedule", path,
                         "--out", tmp_path / "image.png")
    assert code == 0, err
    assert out.count(name) >= 2 and (tmp_path / "image.png").stat().st_size > 0
    # a plan searched at a recorded scale runs at it: another is refused, as for a calibrated schedule (was: any)
    guided = tmp_path / "guided-plan.json"
    save_tmpq_plan(plan.model_copy(update={"measured": {"calibration": {"guidance_scale": 4.5}}}), guided)
    code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPT, "--schedule", guided, "--guidance", 7.0,
                       "--out", tmp_path / "other.png")
    assert code == 2 and "the plan was searched at guidance scale 4.5, this run would use 7" in err, err
    # a stale deployment (the int8 export it was made from re-keyed) is refused by name before anything runs
    manifest_path = build / "manifest.json"
    saved = manifest_path.read_bytes()
    data = json.loads(saved)
    data["mixed"][name]["sources"]["int8"] = "0" * 64
    manifest_path.write_text(json.dumps(data))
    try:
        code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPT, "--schedule", path,
                           "--out", tmp_path / "again.png")
        assert code == 2 and name in err and "made from an older export of int8" in err
        # and check's advice is the one that works: deploy-plan refuses a plan searched on the older export
        code, out, err = cli("check", build)
        assert code == 1 and "made from an older export of int8" in out + err
        assert "search again (`tmpdiff search-plan`) and deploy the new plan" in out + err
    finally:
        manifest_path.write_bytes(saved)


def test_calibrate_inside_the_pipeline_at_the_plans_timesteps(mixed_deployment, t2i_int8_build, tmp_path):
    """The combination on the t2i model: TMPDiff's per-step precision searched in the pipeline over a TMPQ-DM plan's
    timesteps; the schedule names them and runs through `run --pipeline` at exactly those."""
    from tmpdiff.formats.schedule import load_schedule

    build, plan_path, _, _, _ = mixed_deployment
    root, _, prompts = t2i_int8_build
    out = tmp_path / "combo.json"
    code, _, err = cli("calibrate", build, "--costs", root / "costs.json", "--pipeline", t2i_dir(), "--prompts", prompts,
                       "--calib-seeds", 0, "--timesteps-from", plan_path, "--speedup", 1.3, "--out", out)
    assert code == 0, err
    schedule = load_schedule(out)
    assert schedule.timesteps == TIMESTEPS and schedule.steps == 4 and "int8" in schedule.precisions
    assert schedule.scheduler.class_name == "DPMSolverMultistepScheduler"
    code, text, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPT, "--schedule", out,
                          "--out", tmp_path / "image.png")
    assert code == 0, err
    assert all(f" {t} " in text for t in TIMESTEPS)
    # timesteps chosen for another solver are refused before anything runs
    other = tmp_path / "other-plan.json"
    data = json.loads(plan_path.read_text())
    data["scheduler"]["class_name"] = "EulerDiscreteScheduler"
    other.write_text(json.dumps(data))
    code, _, err = cli("calibrate", build, "--costs", root / "costs.json", "--pipeline", t2i_dir(), "--prompts", prompts,
                       "--timesteps-from", other, "--speedup", 1.3, "--out", tmp_path / "never.json")
    assert code == 2 and "chosen for EulerDiscreteScheduler" in err and not (tmp_path / "never.json").exists()
