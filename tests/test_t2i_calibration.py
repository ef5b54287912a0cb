"""The bundled text-to-image pipeline end to end: quantization calibrated on captured pipeline inputs, a schedule
calibrated inside the pipeline, run unchanged by `tmpdiff run --pipeline`, and the refusal of another denoiser."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_helpers import cli
from tests.conftest import T2I_PROMPTS as PROMPTS
from tests.conftest import T2I_STEPS as STEPS
from tmpdiff.calibration.exhaustive import tree_steps
from tmpdiff.commands.check import calibration_notes
from tmpdiff.commands.export import calibration_for, resolve_model_dir
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.formats.schedule import load_schedule
from tmpdiff.models.tiny_t2i import t2i_dir
from tmpdiff.runtime.call_memo import CallMemo


@pytest.fixture(scope="module")
def work(t2i_int8_build):
    return t2i_int8_build


def test_export_captures_the_pipelines_denoiser_inputs(work):
    _, build, _ = work
    calibration = load_manifest(build).precisions["int8"].quantization["calibration"]
    assert calibration["source"] == "pipeline prompts, fp32 torch" and calibration["pipeline"] == "PixArtSigmaPipeline"
    assert (calibration["prompts"], calibration["seeds"], calibration["steps"]) == (2, [0], STEPS)
    assert calibration["guidance_scale"] == 4.5  # the pipeline's default, read from its class
    # one batch per denoiser call (cond + uncond rows of both prompts: classifier-free guidance batched)
    assert (calibration["calls"], calibration["rows"], calibration["batches"]) == (STEPS, STEPS * 2 * 2, STEPS)
    # what computed the tensors the scales follow from (a host with other kernels makes other scales)
    from tmpdiff.engines.device import cpu_name

    kernels = torch.backends.cpu.get_cpu_capability()
    assert calibration["captured_on"] == {"torch": torch.__version__, "device": f"cpu: {cpu_name()}", "kernels": kernels}
    notes = calibration_notes(build)
    assert len(notes) == 1 and notes[0].startswith("int8: calibrated on 2 prompts x 1 seeds x 4 steps"), notes
    assert notes[0].endswith(f"captured with torch {torch.__version__} on cpu: {cpu_name()} ({kernels} kernels)"), notes


def test_random_calibration_only_when_asked():
    model_dir = resolve_model_dir("bundled-t2i", None)
    with pytest.raises(TmpdiffError, match="pass --prompts FILE .* or --random-calibration"):
        calibration_for(model_dir, [0], None)
    recipe, sampling = calibration_for(model_dir, [0], None, random=True)
    assert recipe.description["source"] == "random inputs" and sampling is None
    assert recipe.description["batches"] == 8
    fewer, _ = calibration_for(model_dir, [0], None, random=True, random_batches=2)
    assert fewer.description["batches"] == 2 and fewer.description != recipe.description  # a different export key
    with pytest.raises(TmpdiffError, match="--random-batches"):
        calibration_for(model_dir, [0], None, random_batches=2)
    assert calibration_for(model_dir, [0], None, needed=False) == (None, None)  # fp32 alone needs no data
    code, _, err = cli("export", "bundled-t2i", "--precisions", "int8", "--out", "unused")
    assert code == 2 and "--random-calibration" in err and "transformer" in err, err


def test_calibrate_in_the_pipeline_and_run_the_schedule_unchanged(work, tmp_path):
    root, build, prompts = work
    schedule_path = tmp_path / "schedule.json"
    code, out, err = cli("calibrate", build, "--costs", root / "costs.json", "--pipeline", t2i_dir(), "--prompts", prompts,
                         "--calib-seeds", "0", "--steps", STEPS, "--speedup", 1.3, "--out", schedule_path,
                         "--report", tmp_path / "report", "--threads", 1)
    assert code == 0, err
    schedule = load_schedule(schedule_path)
    assert schedule.steps == STEPS and set(schedule.precisions) <= {"fp32", "int8"} and "int8" in schedule.precisions
    assert schedule.scheduler.class_name == "DPMSolverMultistepScheduler"  # the pipeline's own scheduler
    measured = schedule.measured.model_dump()
    assert 0 < measured["ssim"] <= 1 and measured["latent_error"] >= 0 and measured["samples"] == len(PROMPTS)
    assert 0 <= measured["adherence"] <= 1 and "adherence" in out
    report = json.loads((tmp_path / "report" / "calibration_report.json").read_text())
    assert report["compared"]["all-fp32"]["ssim"] == 1.0 and report["compared"]["all-int8"]["ssim"] < 1.0
    assert (tmp_path / "report" / "grid.png").is_file()

    code, out, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--schedule", schedule_path,
                         "--out", tmp_path / "run.png", "--json", "--threads", 1)
    assert code == 0, err
    ran = [step["precision"] for step in json.loads(out)["steps"]]
    assert ran == schedule.precisions
    # another guidance scale changes every step's error: the schedule's figures would not hold
    code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--schedule", schedule_path,
                       "--guidance", 7.0, "--out", tmp_path / "other.png", "--threads", 1)
    assert code == 2 and "calibrated at guidance scale 4.5, this run would use 7" in err, err
    assert str(schedule_path) in err and not (tmp_path / "other.png").exists()
    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.pipeline_io import load_pipeline

    with pytest.raises(TmpdiffError, match="calibrated at guidance scale 4.5, this run would use 7"):  # Python too
        attach_engines(load_pipeline(t2i_dir()), build, schedule=schedule_path, guidance_scale=7.0)


def test_the_dropin_checks_each_calls_guidance_against_the_calibrated_schedule(work, tmp_path, monkeypatch):
    """Attached at the scale a schedule was calibrated at (4.5, the pipeline's default), a later pipeline call at another
    scale is refused at its first denoiser call, before any engine runs, naming the schedule; where the pipeline
    exposes no scale, a batch without guidance's unconditional copy is refused. A refused call leaves it usable."""
    from tmpdiff.formats.schedule import Schedule, save_schedule
    from tmpdiff.runtime import dropin
    from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline

    _, build, _ = work
    schedule_path, precisions = tmp_path / "schedule.json", ["fp32", "int8", "int8", "fp32"]
    save_schedule(Schedule(steps=STEPS, precisions=precisions, target={"guidance_scale": 4.5}), schedule_path)
    pipe = load_pipeline(t2i_dir())
    denoiser = dropin.attach_engines(pipe, build, schedule=schedule_path, threads=1)

    def call(scale):
        kwargs = call_kwargs(pipe, steps=STEPS, seed=0, guidance_scale=scale, text_len=denoiser.adapter.text_len,
                             sample_size=denoiser.config.get("sample_size"))
        with torch.no_grad():
            return pipe(PROMPTS, output_type="latent", **kwargs).images

    want = call(4.5)
    assert [e.precision for e in denoiser.trace.steps] == precisions
    for scale in (9.0, 1.0):
        with pytest.raises(TmpdiffError, match=f"calibrated at guidance scale 4.5, this run would use {scale:g}:") as err:
            call(scale)
        assert str(schedule_path) in str(err.value) and "\n" not in str(err.value)
        assert denoiser.trace.steps == []  # refused before any engine ran
    assert torch.equal(call(4.5), want)
    monkeypatch.setattr(dropin, "running_guidance", lambda pipe, arguments: None)  # a pipeline that exposes nothing
    with pytest.raises(TmpdiffError, match="calibrated at guidance scale 4.5, this pipeline call runs without "
                                           "classifier-free guidance") as err:
        call(1.0)
    assert str(schedule_path) in str(err.value) and denoiser.trace.steps == []
    assert torch.equal(call(4.5), want)


def test_calibrate_in_the_pipeline_on_one_sample_reports_no_frechet_distance(work, tmp_path):
    """One prompt x one seed calibrates; the Fréchet distance needs two images per set, so it is reported as none
    (was: a scipy traceback after the search, and no schedule written)."""
    import numpy as np

    from tmpdiff.eval.quality import frechet_distance

    root, build, _ = work
    (tmp_path / "one.txt").write_text(PROMPTS[0] + "\n")
    code, out, err = cli("calibrate", build, "--costs", root / "costs.json", "--pipeline", t2i_dir(), "--prompts",
                         tmp_path / "one.txt", "--calib-seeds", "0", "--steps", STEPS, "--speedup", 1.1, "--out",
                         tmp_path / "s.json", "--threads", 1)
    assert code == 0, err
    assert out.count("FD (8-d) vs all-fp32 n/a (one sample)") == 3
    assert load_schedule(tmp_path / "s.json").measured.model_dump()["fd_vs_reference"] is None
    with pytest.raises(ValueError, match="at least 2 samples per set, got 1 and 1"):
        frechet_distance(np.zeros((1, 8)), np.ones((1, 8)))


def test_calibrate_in_the_pipeline_takes_no_refine_and_an_ssim_floor_searches_on_ssim(work, tmp_path, monkeypatch):
    """--no-refine was dropped on the --pipeline path (the knapsack answer was refined anyway), and --min-ssim searched
    latent error by default while its floor is on SSIM."""
    from tmpdiff.calibration import calibrate as calibrate_module

    root, build, prompts = work

    def no_refine(*args, **kwargs):
        raise AssertionError("refined despite --no-refine")

    monkeypatch.setattr(calibrate_module, "refine", no_refine)
    common = ("--costs", root / "costs.json", "--pipeline", t2i_dir(), "--prompts", prompts, "--calib-seeds", "0",
              "--steps", STEPS, "--threads", 1)
    code, _, err = cli("calibrate", build, *common, "--speedup", 1.3, "--no-refine", "--out", tmp_path / "a.json")
    assert code == 0, err
    code, _, err = cli("calibrate", build, *common, "--min-ssim", 0.5, "--out", tmp_path / "b.json")
    assert code == 0, err
    assert load_schedule(tmp_path / "b.json").target["metric"] == "ssim"
    code, _, err = cli("calibrate", build, *common, "--min-ssim", 0.5, "--metric", "latent", "--out", tmp_path / "c.json")
    assert code == 0 and load_schedule(tmp_path / "c.json").target["metric"] == "latent", err


def test_calibrate_refuses_more_calls_than_training_timesteps(work, tmp_path):
    """--steps past the pipeline scheduler's training timesteps is refused by name before any engine runs (the
    pipeline ran and the first repeated timestep was blamed on the request as a NaN)."""
    root, build, prompts = work
    code, _, err = cli("calibrate", build, "--costs", root / "costs.json", "--pipeline", t2i_dir(), "--prompts", prompts,
                       "--steps", 5000, "--speedup", 1.3, "--out", tmp_path / "s.json")
    assert code == 2 and "5000 steps, but the scheduler has 1000 training timesteps" in err, err
    assert not (tmp_path / "s.json").exists()


def test_calibrate_refuses_steps_its_scheduler_repeats_before_any_engine_runs(work, tmp_path, monkeypatch):
    """1000 DPM-Solver steps repeat a timestep: calibrate --pipeline checked only the count against the training
    timesteps, as run --pipeline refuses the repeat. Refused before the pipeline's engines are attached."""
    from tmpdiff.calibration import pipeline_session

    root, build, prompts = work

    def no_engines(*args, **kwargs):
        raise AssertionError("engines were attached")

    monkeypatch.setattr(pipeline_session, "attach_engines", no_engines)
    code, _, err = cli("calibrate", build, "--costs", root / "costs.json", "--pipeline", t2i_dir(), "--prompts", prompts,
                       "--steps", 1000, "--speedup", 1.1, "--out", tmp_path / "s.json")
    assert code == 2 and "DPMSolverMultistepScheduler repeats timesteps at 1000 steps" in err and "Traceback" not in err, err
    assert not (tmp_path / "s.json").exists()

def test_run_in_the_pipeline_refuses_steps_its_scheduler_repeats_before_loading_engines(work, tmp_path, monkeypatch):
    """1000 DPM-Solver steps repeat a timestep (1001 are past its training timesteps): run --pipeline sampled 252 steps
    and blamed the request for a NaN. Refused before any engine loads, as class-conditional runs are; a Heun pipeline
    (two calls per timestep by design) is not refused."""
    from diffusers import HeunDiscreteScheduler

    from tmpdiff.runtime import dropin
    from tmpdiff.runtime.pipeline_io import load_pipeline

    _, build, _ = work

    def no_engines(*args, **kwargs):
        raise AssertionError("engines were loaded")

    with monkeypatch.context() as patched:
        patched.setattr(dropin, "load_plan_engines", no_engines)
        for steps, message in ((1000, "DPMSolverMultistepScheduler repeats timesteps at 1000 steps"),
                               (1001, "1001 steps, but the scheduler has 1000 training timesteps")):
            code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--precision", "fp32",
                               "--steps", steps, "--out", tmp_path / "x.png")
            assert code == 2 and message in err and "Traceback" not in err, err
            assert not (tmp_path / "x.png").exists()
    heun = tmp_path / "heun"
    shutil.copytree(t2i_dir(), heun)
    HeunDiscreteScheduler.from_config(load_pipeline(t2i_dir()).scheduler.config).save_pretrained(heun / "scheduler")
    index = json.loads((heun / "model_index.json").read_text())
    (heun / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", "HeunDiscreteScheduler"]}))
    code, out, err = cli("run", build, "--pipeline", heun, "--prompt", PROMPTS[0], "--precision", "fp32", "--steps", 5,
                         "--out", tmp_path / "heun.png", "--json", "--threads", 1)
    assert code == 0, err
    assert len({step["timestep"] for step in json.loads(out)["steps"]}) == 3  # 3 inference steps, 5 calls


def test_run_in_the_pipeline_checks_the_batch_before_anything_loads(work, tmp_path, monkeypatch):
    """--batch is checked against the memory before its list of prompts is built (10**9 of them: a MemoryError) and
    before the pipeline and engines load (the denoiser's own check comes at the first call)."""
    from tmpdiff.commands import run_prompts
    from tmpdiff.engines import memory

    _, build, _ = work

    def nothing_loads(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(run_prompts, "load_pipeline", nothing_loads)
    with monkeypatch.context() as patched:  # a batch of 4 (x2 with --guidance) is over 1 MiB
        patched.setattr(memory, "available_bytes", lambda: 2**20)
        code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--precision", "fp32",
                           "--steps", 2, "--batch", 4, "--guidance", 4.5, "--out", tmp_path / "x.png")
    assert code == 2 and "8 batch rows" in err and "use a smaller --batch" in err, err
    code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--precision", "fp32",
                       "--steps", 2, "--batch", 10**9, "--out", tmp_path / "x.png")
    assert code == 2 and "1000000000 batch rows" in err and "--batch" in err and "Traceback" not in err, err


def test_run_in_the_pipeline_samples_with_the_schedules_scheduler(work, tmp_path):
    """A schedule runs with the scheduler it names (class and config), as `check --schedule` validates it: 'leading'
    spacing with steps_offset 1 samples at 751, 501, 251 (the pipeline's 'linspace' at 999, 666, 333)."""
    from tmpdiff.formats.schedule import Schedule, SchedulerRef, save_schedule
    from tmpdiff.models.schedulers import load_scheduler

    _, build, _ = work
    own = load_scheduler(t2i_dir() / "scheduler")
    config = {k: v for k, v in own.config.items() if not k.startswith("_")}
    leading = SchedulerRef(class_name=type(own).__name__, config=config | {"timestep_spacing": "leading", "steps_offset": 1})
    path = tmp_path / "leading.json"
    save_schedule(Schedule(steps=3, precisions=["fp32", "int8", "fp32"], scheduler=leading), path)
    code, out, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--schedule", path,
                         "--out", tmp_path / "x.png", "--json", "--threads", 1)
    assert code == 0, err
    assert [(s["timestep"], s["precision"]) for s in json.loads(out)["steps"]] == \
        [(751, "fp32"), (501, "int8"), (251, "fp32")]
    # another noise process is still refused, before the schedule's scheduler is used
    other = leading.model_copy(update={"config": leading.config | {"prediction_type": "epsilon"}})
    save_schedule(Schedule(steps=3, precisions=["fp32", "int8", "fp32"], scheduler=other), path)
    code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--schedule", path,
                       "--out", tmp_path / "y.png")
    assert code == 2 and "another noise process than the pipeline's (prediction_type" in err, err


def test_check_holds_schedules_to_what_run_in_the_pipeline_does(work, tmp_path):
    """A build without sampling info runs inside a pipeline: a schedule naming no scheduler samples with the
    pipeline's (check refused it, run ran it), one naming a scheduler of another noise process than the pipeline the
    int8 export was calibrated in is refused (check passed it, run refused it)."""
    from tmpdiff.formats.schedule import Schedule, SchedulerRef, save_schedule
    from tmpdiff.models.schedulers import load_scheduler

    _, build, _ = work
    plain = tmp_path / "plain.json"
    save_schedule(Schedule(steps=3, precisions=["fp32", "int8", "fp32"]), plain)
    code, out, err = cli("check", build, "--schedule", plain, "--no-spot-check")
    assert code == 0 and f"{build}: ok" in out, out + err
    assert "names no scheduler and the build has no sampling info: the pipeline's scheduler decides" in err, err
    code, out, _ = cli("check", build, "--schedule", plain, "--no-spot-check", "--json")
    assert code == 0 and "the pipeline's scheduler decides" in json.loads(out)["notes"][0], out

    own = load_scheduler(t2i_dir() / "scheduler")
    config = {k: v for k, v in own.config.items() if not k.startswith("_")}
    eps = tmp_path / "eps.json"
    other = SchedulerRef(class_name=type(own).__name__, config=config | {"prediction_type": "epsilon"})
    save_schedule(Schedule(steps=3, precisions=["fp32", "int8", "fp32"], scheduler=other), eps)
    code, out, _ = cli("check", build, "--schedule", eps, "--no-spot-check")
    assert code == 1 and f"{eps}: the schedule's scheduler has another noise process than the pipeline's" in out, out
    assert "prediction_type: 'epsilon' vs 'v_prediction'" in out, out
    code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--schedule", eps,
                       "--out", tmp_path / "x.png")
    assert code == 2 and "another noise process" in err, err
    same = tmp_path / "same.json"
    save_schedule(Schedule(steps=3, precisions=["fp32", "int8", "fp32"],
                           scheduler=SchedulerRef(class_name=type(own).__name__, config=config)), same)
    code, out, err = cli("check", build, "--schedule", same, "--no-spot-check")
    assert code == 0 and "is not compared with the pipeline's" not in err, out + err
    # a build none of whose precisions was calibrated in a pipeline (fp32 alone): nothing to compare with, said so
    from tmpdiff.commands.check import _check_schedule_scheduler
    from tmpdiff.formats.manifest import load_manifest
    from tmpdiff.formats.schedule import load_schedule

    manifest = load_manifest(build)
    fp32_only = manifest.model_copy(update={"precisions": {"fp32": manifest.precisions["fp32"]}})
    notes: list[str] = []
    _check_schedule_scheduler(load_schedule(eps), fp32_only, eps, notes)
    assert notes == [f"{eps}: its scheduler's noise process is not compared with the pipeline's: no precision of this "
                     "build was calibrated in a pipeline (`run --pipeline` compares them)"], notes


def test_calibrate_refuses_a_pipeline_with_another_denoiser(work, tmp_path):
    root, build, prompts = work
    other = tmp_path / "other"
    shutil.copytree(t2i_dir(), other)
    weights = other / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + torch.full_like(tensors[name], 1e-3)
    save_file(tensors, weights)
    code, _, err = cli("calibrate", build, "--costs", root / "costs.json", "--pipeline", other, "--prompts", prompts,
                       "--steps", STEPS, "--speedup", 1.3, "--out", tmp_path / "s.json")
    assert code == 2 and "differs from the model the build was exported from" in err, err
    assert str(other / "transformer") in err and not (tmp_path / "s.json").exists()
    # `run` refuses it too (it never loads the pipeline's denoiser, so the files are compared) ...
    code, _, err = cli("run", build, "--pipeline", other, "--prompt", "a red cat", "--precision", "fp32", "--steps", STEPS,
                       "--out", tmp_path / "run.png")
    assert code == 2 and "differs from the model the build was exported from" in err and "Traceback" not in err, err
    assert not (tmp_path / "run.png").exists()
    # ... and exporting it into the build's directory would drop that build: refused without --force, naming the manifest
    before = (build / "manifest.json").read_bytes()
    code, _, err = cli("export", other, "--subfolder", "transformer", "--out", build.parent, "--model-id", build.name,
                       "--precisions", "fp32", "--random-calibration")
    assert code == 2 and "holds the build of another model" in err and "--force" in err, err
    assert str(build / "manifest.json") in err and (build / "manifest.json").read_bytes() == before


def test_a_resaved_pipeline_is_the_same_model(work, tmp_path):
    """diffusers records where and with which version a config was saved (`_name_or_path`, `_diffusers_version`): a
    pipeline re-saved with the same weights and keys is the build's model."""
    root, build, prompts = work
    resaved = tmp_path / "resaved"
    shutil.copytree(t2i_dir(), resaved)
    config_path = resaved / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config |= {"_name_or_path": str(tmp_path / "somewhere"), "_diffusers_version": "0.0.1"}
    config_path.write_text(json.dumps(config, indent=4))
    code, _, err = cli("run", build, "--pipeline", resaved, "--prompt", "a red cat", "--precision", "fp32",
                       "--steps", STEPS, "--out", tmp_path / "run.png", "--threads", 1)
    assert code == 0, err
    config["patch_size"] = config["patch_size"] + 1  # a key that is the model's: another model
    config_path.write_text(json.dumps(config, indent=4))
    code, _, err = cli("run", build, "--pipeline", resaved, "--prompt", "a red cat", "--precision", "fp32",
                       "--steps", STEPS, "--out", tmp_path / "run2.png")
    assert code == 2 and "differs from the model the build was exported from" in err, err


def test_bench_in_the_pipeline_judges_on_unseen_prompts_and_seeds(work, tmp_path):
    root, build, prompts = work
    unseen = tmp_path / "unseen.txt"
    unseen.write_text("a yellow 1 on a green background\na white 0 on a red background\n")
    code, out, err = cli("bench", build, "--costs", root / "costs.json", "--pipeline", t2i_dir(), "--prompts", prompts,
                         "--unseen-prompts", unseen, "--calib-seeds", "0", "--unseen-seeds", "5,6", "--steps", STEPS,
                         "--speedups", "1.3,2,9", "--refine-evaluations", 2, "--out", tmp_path / "bench", "--threads", 1)
    assert code == 0, err
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert (report["prompts"], report["unseen_prompts"], report["unseen_seeds"]) == (2, 2, [5, 6])
    (run,) = report["runs"]
    assert run["steps"] == STEPS and run["unseen_samples"] == 4 and run["skipped_speedups"] == [9.0]
    fp32, int8 = run["uniform"]
    assert fp32["fallbacks"] == int8["fallbacks"] == {"calib": 0, "unseen": 0}
    assert fp32["unseen"]["one_minus_ssim"]["value"] == 0 and fp32["unseen"]["fd_vs_reference"]["value"] < 1e-6
    assert int8["unseen"]["one_minus_ssim"]["value"] > 0 and int8["speedup"] == pytest.approx(2.0)
    for key in ("latent", "psnr", "correct", "fd_vs_reference"):
        d = int8["unseen"][key]
        assert d["low"] <= d["value"] <= d["high"], (key, d)
    target, matched = run["targets"]
    methods = {r["method"]: r for r in target["rows"]}
    assert {"TMPDiff (ssim)", "TMPDiff refined (latent)", "evolutionary (same evaluations) (ssim)"} <= set(methods)
    for r in methods.values():
        assert r["speedup"] >= 1.3 - 1e-9 and len(r["schedule"]) == STEPS
    assert set(target["headline_versus"]) == set(methods) - {"TMPDiff refined (ssim)"}
    assert target["measured_speedup"] > 0
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "unseen adherence" in md and "target 1.3x" in md and (tmp_path / "bench" / "pareto.png").is_file()
    # a target at a uniform level's cost (int8 here, 2x) is compared with that level: the paper's headline
    same = matched["headline_versus"]["uniform int8 (same cost)"]
    assert matched["speedup"] == 2.0 and "percent" in same["one_minus_ssim"]
    assert "At matched cost, TMPDiff refined (ssim) against uniform int8" in md
    # T <= 12: every two-level schedule through the pipeline, the optimum TMPDiff is judged against
    ex = run["exhaustive_unseen"]
    assert (ex["schedules"], ex["calib_samples"], ex["unseen_samples"]) == (2**STEPS, 2, 4)
    assert ex["step_evaluations"] == 3 * tree_steps(2, STEPS)  # 3 pipeline calls, each tree node run once
    assert {(r["metric"], r["budget_label"]) for r in ex["rows"]} == {(m, f"K={k}") for m in ("latent", "ssim")
                                                                       for k in range(1, STEPS)}
    for r in ex["rows"]:
        for method in r["methods"].values():  # nothing beats the optimum of the samples it is the optimum of
            assert method["calib_ratio"] >= 1 - 1e-12 and method["unseen"]["ratio_to_optimum"]["value"] >= 1 - 1e-12
    assert f"(exhaustive) T = {STEPS}" in md and "x 2 prompts" in md
    assert (tmp_path / "bench" / ex["table"]).is_file()
    floor = ex["selection_floor"]["summary"]["latent"]  # an optimum of half the samples, judged on the other half
    assert floor["floor_mean_worst_budget"] >= 1 - 1e-12 and floor["refined_mean_worst_budget"] >= 1 - 1e-12
    curve = ex["size_curve"]  # drawn from the calibration prompts only, judged on the unseen prompts only
    assert (curve["pool_samples"], curve["unseen_samples"]) == (2, 4)
    assert (ex["split_curve"]["samples"], ex["split_curve"]["sizes"]) == (6, [3])  # 2 + 4 prompts x seeds, halved
    assert "random halvings of all 6 samples" in md


def test_exhaustive_walk_through_the_pipeline_is_exact(work):
    """The table of the prefix-reusing walk equals judging every schedule by its own plain pipeline calls."""
    import itertools

    import numpy as np

    from tmpdiff.calibration.pipeline_bench import PipelineJudge
    from tmpdiff.calibration.pipeline_exhaustive import build_pipeline_table
    from tmpdiff.calibration.pipeline_session import open_pipeline_session

    root, build, _ = work
    session = open_pipeline_session(build, root / "costs.json", t2i_dir(), PROMPTS, [0], STEPS, threads=1)
    try:
        table = build_pipeline_table(session, [(PROMPTS, [0, 3])], ["fp32", "int8"], progress=False)
        assert table.step_evaluations == 2 * tree_steps(2, STEPS) < 2 * STEPS * 2**STEPS
        assert session.evaluator.denoiser.call_memo is None  # the walk leaves the denoiser as it found it
        plain = PipelineJudge(session, PROMPTS, [0, 3])
        plain.evaluator.memo = None  # every schedule's own calls
        samples = np.arange(4)
        for schedule in itertools.product(["fp32", "int8"], repeat=STEPS):
            judged = plain(schedule)
            for metric in ("latent", "one_minus_ssim", "psnr"):
                assert np.array_equal(table.values(metric, schedule, samples), judged[metric]), (schedule, metric)
        assert table.values("latent", ("int8",) * STEPS, samples).min() > 0  # the walk did run int8
        assert table.fallbacks is not None and not table.fallbacks.any()
        # an int8 engine that overflows at the first step: every schedule starting with int8 fell back there
        engines = session.evaluator.denoiser.engines
        engines["int8"] = _NaNAtFirstStep(engines["int8"])
        fell = build_pipeline_table(session, [(PROMPTS, [0])], ["fp32", "int8"], progress=False).fallbacks
        for schedule in itertools.product(["fp32", "int8"], repeat=STEPS):
            row = fell[table.row(schedule)]
            assert (row == 1).all() if schedule[0] == "int8" else not row.any(), schedule
    finally:
        session.evaluator.close()


class _NaNAtFirstStep:
    """Wraps an engine so its output is NaN at the first (noisiest) step, as an overflowing engine's can be."""

    def __init__(self, engine) -> None:
        self.engine, self.precision, self.device = engine, engine.precision, engine.device
        self.input_specs, self.output_specs = engine.input_specs, engine.output_specs

    def bind(self, inputs, outputs):
        self.inputs, self.outputs = inputs, outputs
        self.engine.bind(inputs, outputs)

    def run(self, stream):
        self.engine.run(stream)
        if float(self.inputs["timestep"].max()) > 900:
            for out in self.outputs.values():
                out.fill_(float("nan"))

    def unbind(self):
        self.engine.unbind()

    def close(self):
        self.engine.close()


def test_prompt_encodings_are_made_once_and_change_no_sample(work):
    from tmpdiff.calibration.pipeline_session import open_pipeline_session

    root, build, _ = work
    session = open_pipeline_session(build, root / "costs.json", t2i_dir(), PROMPTS, [0, 3], STEPS, threads=1)
    ev = session.evaluator
    try:
        encoder = ev.encoder_memos["text_encoder"]
        made = encoder.misses  # the reference run's: one pipeline call per seed, the same prompts
        assert made > 0 and encoder.hits == made
        assert "forward" not in vars(ev.pipe.text_encoder)  # the pipeline is left as it was
        ev.memo = None  # engines run every call: only the encodings are reused
        schedule = ["int8", "fp32"] * (STEPS // 2)
        reused = ev.latents(schedule)
        assert encoder.misses == made and encoder.hits == 3 * made
        assert torch.equal(reused, ev._run_calls(schedule)[0])  # the same samples as encoding every call
    finally:
        ev.close()


def test_call_memo_reuses_only_identical_calls():
    memo = CallMemo()
    assert memo.summary() == "0 run, 0 reused"  # nothing run here (a fanned-out search's driver)
    feeds = {"hidden_states": torch.ones(2, 3), "timestep": torch.tensor([5.0])}
    assert memo.lookup(memo.key(0, "int8", feeds)) is None
    memo.store(memo.key(0, "int8", feeds), torch.full((2, 3), 7.0), "int8", None)
    feeds["hidden_states"] += 1  # the caller's buffer changes after the call: the kept copy does not
    assert memo.lookup(memo.key(0, "int8", feeds)) is None
    feeds["hidden_states"] -= 1
    output, used, fallback = memo.lookup(memo.key(0, "int8", feeds))
    assert torch.equal(output, torch.full((2, 3), 7.0)) and used == "int8" and fallback is None
    output += 1  # a reused output is the caller's own copy
    assert torch.equal(memo.lookup(memo.key(0, "int8", feeds))[0], torch.full((2, 3), 7.0))
    assert memo.lookup(memo.key(0, "fp32", feeds)) is None and memo.lookup(memo.key(1, "int8", feeds)) is None  # precision, step
    assert memo.lookup(memo.key(0, "int8", {**feeds, "timestep": torch.tensor([5.0], dtype=torch.float64)})) is None  # dtype
    assert (memo.hits, memo.misses) == (2, 5)


def test_call_memo_keeps_every_recent_call_within_its_bytes():
    memo = CallMemo(max_bytes=3 * 4 * 4)  # three outputs of four float32
    feeds = [{"hidden_states": torch.full((4,), float(i))} for i in range(4)]
    for i in range(3):
        memo.store(memo.key(0, "int8", feeds[i]), torch.full((4,), 10.0 + i), "int8", None)
    assert torch.equal(memo.lookup(memo.key(0, "int8", feeds[0]))[0], torch.full((4,), 10.0))  # not only the latest
    memo.store(memo.key(0, "int8", feeds[3]), torch.full((4,), 13.0), "int8", None)  # drops the least recently used: 1
    assert memo.lookup(memo.key(0, "int8", feeds[1])) is None
    assert all(memo.lookup(memo.key(0, "int8", feeds[i])) is not None for i in (0, 2, 3))
    assert len(memo) == 3 and memo.kept_bytes == 48


def test_bench_pipeline_options_go_together(work, tmp_path):
    root, build, prompts = work
    code, _, err = cli("bench", build, "--costs", root / "costs.json", "--prompts", prompts, "--out", tmp_path / "b")
    assert code == 2 and "--pipeline and --prompts go together" in err
    code, _, err = cli("bench", build, "--costs", root / "costs.json", "--pipeline", t2i_dir(), "--prompts", prompts,
                       "--calib-seeds", "0", "--unseen-seeds", "0", "--out", tmp_path / "b")
    assert code == 2 and "shares prompts and seeds" in err and not (tmp_path / "b").exists()
    one = tmp_path / "one.txt"
    one.write_text("a yellow 1 on a green background\n")
    code, _, err = cli("bench", build, "--costs", root / "costs.json", "--pipeline", t2i_dir(), "--prompts", prompts,
                       "--unseen-prompts", one, "--calib-seeds", "0", "--unseen-seeds", "100,101", "--out", tmp_path / "b")
    assert code == 2 and "3 in the unseen set" in err and not (tmp_path / "b").exists()  # it failed after the searches


@pytest.mark.parametrize("mode, workers", [("aggressive", 2), ("conservative", 2), ("conservative", 3)])
def test_pipeline_drafts_ahead_in_rounds(work, mode, workers):
    """DRiffusion in the drop-in: each step runs once, on its own precision, in the mode's rounds; without guidance
    (one branch) the images stay close to sequential sampling's."""
    import numpy as np
    from skimage.metrics import structural_similarity

    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.parallel import expected_rounds
    from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline

    _, build, _ = work
    steps, schedule = 6, ["fp32", "int8", "fp32", "int8", "int8", "fp32"]

    def sample(parallel):
        pipe = load_pipeline(t2i_dir())
        denoiser = attach_engines(pipe, build, schedule=schedule, parallel=parallel, mode=mode, guidance_scale=1.0,
                                  threads=1)
        kwargs = call_kwargs(pipe, steps=steps, seed=3, guidance_scale=1.0, text_len=denoiser.adapter.text_len,
                             sample_size=denoiser.config.get("sample_size"))
        images = pipe(PROMPTS, output_type="np", **kwargs).images
        return np.asarray(images), denoiser

    sequential, _ = sample(1)
    drafted, denoiser = sample(workers)
    events = denoiser.trace.steps
    assert sorted(e.index for e in events) == list(range(steps))
    assert [e.precision for e in sorted(events, key=lambda e: e.index)] == schedule
    assert denoiser.drafts.rounds == expected_rounds(steps, workers, mode) < steps
    ssim = np.mean([structural_similarity(a, b, channel_axis=-1, data_range=1) for a, b in zip(sequential, drafted, strict=True)])
    assert 0.97 < ssim < 1.0, ssim  # drafts change the noise estimates a little, never to another image


def test_pipeline_drafts_refuse_what_cannot_be_drafted(work):
    _, build, _ = work
    from diffusers import EulerDiscreteScheduler

    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.pipeline_io import load_pipeline

    pipe = load_pipeline(t2i_dir())
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(TmpdiffError, match="EulerDiscreteScheduler cannot be drafted"):
        attach_engines(pipe, build, precision="fp32", parallel=2)
    code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--precision", "fp32",
                       "--executor", "ray", "--out", "unused.png")
    assert code == 2 and "--executor ray needs --parallel 2 or more" in err, err
    code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--precision", "fp32",
                       "--parallel", 2, "--address", "127.0.0.1:1", "--out", "unused.png")
    assert code == 2 and "--address names a Ray cluster: it needs --executor ray" in err, err


def test_pipeline_drafts_keep_low_signal_steps_sequential(work):
    """--draft-min-alpha 1 drafts nothing: every step is its own round and the images are sequential sampling's,
    bit for bit; the CLI refuses the option without --parallel."""
    import numpy as np

    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline

    _, build, _ = work

    def sample(parallel, min_alpha=0.0):
        pipe = load_pipeline(t2i_dir())
        denoiser = attach_engines(pipe, build, precision="int8", parallel=parallel, mode="aggressive", threads=1,
                                  min_alpha=min_alpha)
        kwargs = call_kwargs(pipe, steps=STEPS, seed=1, guidance_scale=None, text_len=denoiser.adapter.text_len,
                             sample_size=denoiser.config.get("sample_size"))
        return np.asarray(pipe(PROMPTS, output_type="np", **kwargs).images), denoiser

    sequential, _ = sample(1)
    kept, denoiser = sample(3, min_alpha=1.0)
    assert denoiser.drafts.rounds == STEPS and np.array_equal(kept, sequential)
    code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--precision", "fp32",
                       "--draft-min-alpha", 0.5, "--out", "unused.png")
    assert code == 2 and "--draft-min-alpha applies to --pipeline --parallel" in err, err


@pytest.mark.parametrize("mode", ["conservative", "aggressive"])
def test_pipeline_drafts_on_ray_actors_give_the_in_process_images(work, mode):
    """The drafts on Ray actors (anchor here): the same images as the in-process drop-in, bit for bit; a killed
    actor fails the next pipeline call in one line."""
    pytest.importorskip("ray")
    import numpy as np

    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline

    _, build, _ = work
    schedule = ["fp32", "int8", "int8", "fp32", "int8", "fp32"]

    def sample(executor):
        from tmpdiff.runtime.dropin_ray import attach_with_ray_drafts

        pipe = load_pipeline(t2i_dir())
        attach = attach_with_ray_drafts if executor == "ray" else attach_engines
        denoiser = attach(pipe, build, schedule=schedule, parallel=3, mode=mode, threads=1)
        kwargs = call_kwargs(pipe, steps=len(schedule), seed=2, guidance_scale=None, text_len=denoiser.adapter.text_len,
                             sample_size=denoiser.config.get("sample_size"))
        return pipe, denoiser, kwargs

    pipe, local, kwargs = sample("local")
    want = np.asarray(pipe(PROMPTS, output_type="np", **kwargs).images)
    pipe, remote, kwargs = sample("ray")
    try:
        assert remote.draft_pool.workers == (3 if mode == "conservative" else 2)
        got = np.asarray(pipe(PROMPTS, output_type="np", **kwargs).images)
        assert np.array_equal(got, want) and remote.drafts.rounds == local.drafts.rounds
        events = sorted(remote.trace.steps, key=lambda e: e.index)
        assert [e.index for e in events] == list(range(len(schedule))) and [e.precision for e in events] == schedule
        import ray

        ray.kill(remote.draft_pool.actors[-1])
        with pytest.raises(TmpdiffError, match="Ray draft worker died mid-run"):
            pipe(PROMPTS, output_type="np", **kwargs)
    finally:
        remote.close()


def _closed_denoisers(monkeypatch) -> list:
    """Record every `EngineDenoiser` closed from here on."""
    from tmpdiff.runtime.dropin import EngineDenoiser

    closed, close = [], EngineDenoiser.close

    def recording(self):
        closed.append(self)
        close(self)

    monkeypatch.setattr(EngineDenoiser, "close", recording)
    return closed


def test_ray_drafts_that_fail_to_start_leave_the_pipeline_as_it_was(work, monkeypatch):
    """The draft actors failing to start: the engines loaded for the new denoiser are freed and the pipeline keeps
    its own denoiser."""
    from tmpdiff.runtime import dropin_ray
    from tmpdiff.runtime.pipeline_io import load_pipeline

    def no_pool(*_, **__):
        raise TmpdiffError("a Ray draft worker failed to start: no engine")

    _, build, _ = work
    pipe = load_pipeline(t2i_dir())
    before = pipe.transformer
    closed = _closed_denoisers(monkeypatch)
    monkeypatch.setattr(dropin_ray, "DraftPool", no_pool)
    with pytest.raises(TmpdiffError, match="failed to start: no engine"):
        dropin_ray.attach_with_ray_drafts(pipe, build, precision="fp32", parallel=2, threads=1)
    assert pipe.transformer is before and len(closed) == 1 and closed[0]._closed


def test_run_prompts_closes_the_denoiser_when_the_call_cannot_start(work, monkeypatch):
    """Whatever fails after the engines are attached, the denoiser (and any Ray actors of its drafts) is closed."""
    from tmpdiff.commands import run_prompts as module

    def broken(*_, **__):
        raise TmpdiffError("no call")

    _, build, _ = work
    closed = _closed_denoisers(monkeypatch)
    monkeypatch.setattr(module, "call_kwargs", broken)
    with pytest.raises(TmpdiffError, match="no call"):
        module.run_prompts(module.PromptRequest(build_dir=build, pipeline_dir=t2i_dir(), prompts=PROMPTS[:1],
                                                precision="fp32", steps=2, threads=1))
    assert len(closed) == 1
    code, _, err = cli("run", build, "--pipeline", t2i_dir(), "--prompt", PROMPTS[0], "--precision", "fp32",
                       "--steps", 3, "--parallel", 3, "--executor", "ray", "--out", "unused.png")
    assert code == 2 and "--parallel 3 starts more Ray workers than the 2 calls a round of 3 steps" in err, err


def test_the_bundled_pipeline_is_named_by_its_short_name(work, tmp_path):
    """`--pipeline bundled-t2i` is the bundled text-to-image pipeline, as MODEL arguments take it."""
    _, build, _ = work
    code, _, err = cli("run", build, "--pipeline", "bundled-t2i", "--prompt", "a red 3 on a blue background",
                       "--precision", "fp32", "--steps", 2, "--out", tmp_path / "x.png", "--threads", 1)
    assert code == 0 and (tmp_path / "x.png").is_file(), err


def test_a_resaved_pipeline_keeps_its_calibration_recipe(tmp_path):
    """diffusers' version stamp in the scheduler config is not part of the calibration: a re-saved pipeline's
    quantized exports stay up to date; a real scheduler change is still seen."""
    from tmpdiff.runtime.capture import PipelineCapture, prompted_recipe

    pipeline = tmp_path / "pipe"
    shutil.copytree(t2i_dir(), pipeline)
    capture = PipelineCapture(pipeline, ["a red circle"], [0], 2, None)
    before = prompted_recipe(capture).description
    config_path = pipeline / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text(), parse_constant=float)
    config_path.write_text(json.dumps(config | {"_diffusers_version": "9.9.9"}))
    assert prompted_recipe(capture).description == before
    encoder_config = pipeline / "text_encoder" / "config.json"
    encoder = json.loads(encoder_config.read_text())
    encoder_config.write_text(json.dumps(encoder | {"transformers_version": "9.9.9", "_name_or_path": "elsewhere"}))
    assert prompted_recipe(capture).description == before
    config_path.write_text(json.dumps(config | {"solver_order": 3}))
    assert prompted_recipe(capture).description != before
    config_path.write_text(json.dumps(config))
    # the text encoder and tokenizer make the denoiser's inputs: other weights or vocabulary, other calibration data
    weights = pipeline / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    save_file(tensors | {name: tensors[name] * 1.01}, weights)
    changed = prompted_recipe(capture).description
    assert changed != before and changed["conditioning"]["tokenizer"] == before["conditioning"]["tokenizer"]
    tokenizer = pipeline / "tokenizer" / "tokenizer_config.json"
    tokenizer.write_text(tokenizer.read_text() + " ")
    assert prompted_recipe(capture).description["conditioning"]["tokenizer"] != before["conditioning"]["tokenizer"]
