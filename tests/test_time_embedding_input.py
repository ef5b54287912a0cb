"""MTEO deployed: graphs that take the per-block time embeddings as an input, the build's own table, /3 plans that
name learned rows or timestep shifts, and every way such a plan or build can be wrong."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from tests.cli_helpers import cli
from tmpdiff.calibration.few_step import ClassConditioning, FewStepSampler, make_scheduler
from tmpdiff.calibration.mteo import DistillConfig, Distiller
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.formats.schedule import Schedule, load_schedule
from tmpdiff.formats.time_embeddings import TimeEmbeddingsInfo
from tmpdiff.models.bundled import sampling_info
from tmpdiff.models.time_embedding_input import INPUT_NAME, load_own_table
from tmpdiff.models.time_embeddings import embedding_slots, own_embeddings, save_time_embeddings
from tmpdiff.runtime.runner import initial_noise

STEPS = 4


@pytest.fixture(scope="module")
def embedding_build(tmp_path_factory, bundled):
    """The bundled model exported with --time-embedding-input at fp32 and int8, built for ORT-CPU."""
    from tests.conftest import small_calibration
    from tmpdiff.engines.build import build_engines
    from tmpdiff.export.exporter import export_model

    root = tmp_path_factory.mktemp("embbuild")
    build_dir, _ = export_model(bundled.transformer_dir, root, ["fp32", "int8"], model_id="tiny-dit",
                                calibration=small_calibration(bundled), sampling=sampling_info(bundled),
                                time_embedding_input=True)
    build_engines(build_dir, "ort", "cpu")
    return build_dir


@pytest.fixture(scope="module")
def plain_build(fp32_build, bundled):
    """The plain fp32 export with sampling info, built (a copy: the session fixture stays as it is)."""
    from tmpdiff.engines.build import build_engines
    from tmpdiff.export.exporter import export_model

    build_dir, _ = export_model(bundled.transformer_dir, fp32_build.parent.parent / "plain-copy", ["fp32"],
                                model_id="tiny-dit", sampling=sampling_info(bundled))
    build_engines(build_dir, "ort", "cpu")
    return build_dir


@pytest.fixture(scope="module")
def learned(bundled, tmp_path_factory):
    """A briefly distilled MTEO table and shift vector for 4 DPM-Solver++ steps, in files in one plan directory."""
    from tmpdiff.models.loading import load_diffusers_model

    model = load_diffusers_model(bundled.transformer_dir)
    s = sampling_info(bundled)
    distiller = Distiller(model, dict(s.scheduler_config), s.guidance_scale,
                          ClassConditioning(s.num_classes, s.null_class), s.channels, s.image_size)
    folder = tmp_path_factory.mktemp("plans")
    files = {}
    for kind in ("mteo", "timestep-shift"):
        cfg = DistillConfig(solver="dpmsolver++", steps=STEPS, kind=kind, iterations=6, batch=4, train_samples=8,
                            validation_samples=2, reference_steps=10)
        result = distiller.distill(cfg, "final", distiller.data(cfg))
        info = TimeEmbeddingsInfo(kind=kind, model="tiny-dit", model_parameters=3, solver=cfg.solver, steps=STEPS,
                                  timesteps=distiller.timesteps(cfg.solver, STEPS),
                                  slots=embedding_slots(model) if kind == "mteo" else [],
                                  dim=int(result.tensor.shape[-1]) if kind == "mteo" else 0,
                                  trained_parameters=int(result.tensor.numel()), guidance_scale=s.guidance_scale,
                                  reference_steps=cfg.reference_steps, train_seed=cfg.train_seed,
                                  train_samples=cfg.train_samples, validation_seed=cfg.validation_seed,
                                  iterations=cfg.iterations, loss="final", runs=[result.record])
        files[kind] = folder / f"{kind}.safetensors"
        save_time_embeddings(files[kind], result.tensor, info)
    return distiller, s, files


def _run(build_dir: Path, *args: str) -> tuple[int, str, str]:
    return cli("run", build_dir, "--class", "1,7", "--seed", "3", "--json", *args)


def _latents(build_dir: Path, schedule: Path | None = None, precision: str | None = None) -> torch.Tensor:
    from tmpdiff.commands.run import RunRequest, run

    result, _, _ = run(RunRequest(build_dir=build_dir, classes=[1, 7], seed=3, schedule_path=schedule,
                                  precision=precision, steps=None if precision is None else STEPS))
    return result.latents


def test_the_graphs_take_embeddings_instead_of_the_timestep(embedding_build, bundled, torch_dit):
    manifest = load_manifest(embedding_build)
    entry = manifest.time_embedding_input
    assert entry is not None and json.loads((embedding_build / "manifest.json").read_text())["format"] == \
        "tmpdiff.manifest/3"
    assert entry.slots == embedding_slots(torch_dit) and entry.dim == 192 and entry.train_timesteps == 1000
    for precision in ("fp32", "int8"):
        graph = onnx.load(str(embedding_build / manifest.precisions[precision].onnx), load_external_data=False)
        inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
        assert set(inputs) == {"hidden_states", "class_labels", INPUT_NAME} and inputs[INPUT_NAME] == [5, 192]
        assert not any("timestep_embedder" in n.name for n in graph.graph.node)  # the MLPs left the graph
    table = load_own_table(embedding_build, manifest)
    for t in (0, 417, 999):
        assert torch.allclose(table[t], own_embeddings(torch_dit, [t])[0], atol=1e-5)


def test_plain_schedules_run_on_the_own_table_as_on_plain_graphs(embedding_build, plain_build):
    got, want = _latents(embedding_build, precision="fp32"), _latents(plain_build, precision="fp32")
    assert (got - want).abs().max() < 1e-3
    code, out, err = _run(embedding_build, "--precision", "int8", "--steps", "6", "--out",
                          embedding_build.parent / "int8.png")
    assert code == 0, err and len(json.loads(out)["steps"]) == 6


def test_an_mteo_plan_runs_the_learned_rows_as_the_torch_sampler_does(embedding_build, plain_build, learned):
    distiller, s, files = learned
    plan = files["mteo"].parent / "mteo-plan.json"
    code, out, err = cli("plan-embeddings", embedding_build, files["mteo"], "--out", plan)
    assert code == 0, err
    schedule = load_schedule(plan)
    assert schedule.format == "tmpdiff.schedule/3" and schedule.time_embeddings == "mteo.safetensors"
    got = _latents(embedding_build, plan)
    from tmpdiff.models.time_embeddings import load_time_embeddings

    table, _ = load_time_embeddings(files["mteo"])
    sampler = FewStepSampler(distiller.model, STEPS, s.guidance_scale, distiller.conditioning, s.channels)
    with torch.no_grad():
        want = sampler.sample_states(make_scheduler("dpmsolver++", dict(s.scheduler_config)), torch.tensor([1, 7]),
                                     initial_noise(2, s.channels, s.image_size, 3), embeddings=table)[-1]
    assert (got - want).abs().max() < 1e-3
    assert (got - _latents(embedding_build, precision="fp32")).abs().max() > 1e-2  # the rows are fed, not the own ones
    # the same rows on plain graphs cannot be fed: refused before anything runs, naming the file
    code, _, err = _run(plain_build, "--schedule", plan, "--out", plan.parent / "x.png")
    assert code == 2 and "--time-embedding-input" in err and "mteo.safetensors" in err
    assert not (plan.parent / "x.png").exists()
    # the guidance scale the rows were learned at
    code, _, err = _run(embedding_build, "--schedule", plan, "--guidance", "3", "--out", plan.parent / "y.png")
    assert code == 2 and "guidance scale 2.0" in err


def test_a_shift_plan_runs_on_plain_graphs_as_the_torch_sampler_does(plain_build, learned):
    distiller, s, files = learned
    plan = files["timestep-shift"].parent / "shift-plan.json"
    assert cli("plan-embeddings", plain_build, files["timestep-shift"], "--out", plan)[0] == 0
    from tmpdiff.models.time_embeddings import load_time_embeddings

    shifts, _ = load_time_embeddings(files["timestep-shift"])
    assert shifts.abs().max() > 0
    sampler = FewStepSampler(distiller.model, STEPS, s.guidance_scale, distiller.conditioning, s.channels)
    with torch.no_grad():
        want = sampler.sample_states(make_scheduler("dpmsolver++", dict(s.scheduler_config)), torch.tensor([1, 7]),
                                     initial_noise(2, s.channels, s.image_size, 3), shifts=shifts)[-1]
    assert (_latents(plain_build, plan) - want).abs().max() < 1e-3


def test_drafted_calls_get_their_steps_rows(embedding_build, learned):
    """DRiffusion with one worker is the sequential sampler bit for bit, rows included; two workers run."""
    from tmpdiff.models.schedulers import schedule_scheduler
    from tmpdiff.runtime.parallel import sample_parallel
    from tmpdiff.runtime.plan import resolve_plan
    from tmpdiff.runtime.workers import InProcessExecutor, WorkerSpec

    _, s, files = learned
    plan_path = files["mteo"].parent / "mteo-plan-2.json"
    assert cli("plan-embeddings", embedding_build, files["mteo"], "--out", plan_path, "--precision", "int8")[0] == 0
    plan = resolve_plan(plan_path)
    spec = WorkerSpec(embedding_build, "ort", "cpu", ("int8",), 1, 2, s.channels, s.image_size, s.guidance_scale,
                      s.null_class, s.num_classes)
    worker = spec.build()
    labels, noise = torch.tensor([1, 7]), initial_noise(2, s.channels, s.image_size, 3)
    manifest = load_manifest(embedding_build)
    sequential = worker.runner.sample(schedule_scheduler(plan.file, manifest.sampling), labels, noise,
                                      list(plan.precisions), conditioning=plan.conditioning).latents
    one = sample_parallel(InProcessExecutor(worker, 1), schedule_scheduler(plan.file, manifest.sampling), labels, noise,
                          list(plan.precisions), conditioning=plan.conditioning)
    assert torch.equal(one.latents, sequential)
    two = sample_parallel(InProcessExecutor(worker, 2), schedule_scheduler(plan.file, manifest.sampling), labels, noise,
                          list(plan.precisions), conditioning=plan.conditioning)
    assert two.rounds < STEPS and torch.isfinite(two.latents).all()


def test_plans_that_cannot_run_are_refused_by_name(embedding_build, learned, tmp_path):
    _, _, files = learned
    folder = tmp_path / "plans"
    folder.mkdir()
    shutil.copy(files["mteo"], folder / "rows.safetensors")
    plan = folder / "plan.json"
    assert cli("plan-embeddings", embedding_build, folder / "rows.safetensors", "--out", plan)[0] == 0
    data = json.loads(plan.read_text())
    # an output onto the embeddings the plan reads (named .json, so --trace may name it): refused even with --force
    shutil.copy(files["mteo"], folder / "rows.json")
    (folder / "json-rows.json").write_text(json.dumps({**data, "time_embeddings": "rows.json"}))
    code, _, err = _run(embedding_build, "--schedule", folder / "json-rows.json", "--out", tmp_path / "t.png",
                        "--trace", folder / "rows.json", "--force")
    assert code == 2 and "input of this command" in err and "rows.json" in err, err
    assert (folder / "rows.json").read_bytes() == files["mteo"].read_bytes() and not (tmp_path / "t.png").exists()
    # a name that leaves the plan's directory
    (folder / "escape.json").write_text(json.dumps({**data, "time_embeddings": "../rows.safetensors"}))
    code, _, err = _run(embedding_build, "--schedule", folder / "escape.json", "--out", tmp_path / "a.png")
    assert code == 2 and "escape.json" in err and "inside it" in err
    # a symlink out of it
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(files["mteo"], outside)
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "link.json").write_text(json.dumps({**data, "time_embeddings": "link.safetensors"}))
    code, _, err = _run(embedding_build, "--schedule", folder / "link.json", "--out", tmp_path / "b.png")
    assert code == 2 and "outside the schedule's directory" in err
    # another step count than the rows'
    (folder / "steps.json").write_text(json.dumps({**data, "steps": 5, "precisions": ["fp32"] * 5}))
    code, _, err = _run(embedding_build, "--schedule", folder / "steps.json", "--out", tmp_path / "c.png")
    assert code == 2 and "4 steps of time embeddings for a schedule of 5 steps" in err
    # a /2 file that names time embeddings
    (folder / "v2.json").write_text(json.dumps({**data, "format": "tmpdiff.schedule/2"}))
    code, _, err = _run(embedding_build, "--schedule", folder / "v2.json", "--out", tmp_path / "d.png")
    assert code == 2 and "tmpdiff.schedule/3" in err
    # another solver's spacing: the rows were learned for other timesteps
    (folder / "ddim.json").write_text(json.dumps({**data, "scheduler": {
        "class_name": "DDIMScheduler", "config": data["scheduler"]["config"]}}))
    code, _, err = _run(embedding_build, "--schedule", folder / "ddim.json", "--out", tmp_path / "e.png")
    assert code == 2 and "learned for dpmsolver++ (DPMSolverMultistepScheduler), the scheduler is DDIMScheduler" in err
    # a damaged rows file
    (folder / "rows.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = _run(embedding_build, "--schedule", plan, "--out", tmp_path / "f.png")
    assert code == 2 and "rows.safetensors" in err
    assert not any(tmp_path.glob("*.png"))
    # a plan object that names a file but has no directory to resolve it in
    with pytest.raises(TmpdiffError, match="read from its file"):
        from tmpdiff.runtime.plan import resolve_plan

        resolve_plan(Schedule.model_validate({**data}))


def test_a_damaged_own_table_is_refused_by_check_and_run(embedding_build, tmp_path):
    copy = tmp_path / "tiny-dit"
    shutil.copytree(embedding_build, copy)
    table = copy / load_manifest(copy).time_embedding_input.own_table
    data = bytearray(table.read_bytes())
    data[-8] ^= 0xFF
    table.write_bytes(bytes(data))
    code, out, _ = cli("check", copy)
    assert code != 0 and "own_time_embeddings.safetensors" in out and "sha256" in out
    code, _, err = _run(copy, "--precision", "fp32", "--out", tmp_path / "x.png")
    assert code == 2 and "own_time_embeddings.safetensors" in err and not (tmp_path / "x.png").exists()


def test_profile_knows_the_input(embedding_build, tmp_path):
    """(The pipeline drop-in feeding rows is tested on the text-to-image model: tests/test_mteo_t2i.py.)"""
    code, _, err = cli("profile", embedding_build, "--backend", "ort", "--batch", "2", "--warmup", "0", "--repeats", "1",
                       "--out", tmp_path / "costs.json")
    assert code == 0, err
    assert set(json.loads((tmp_path / "costs.json").read_text())["precisions"]) == {"fp32", "int8"}


def test_rows_learned_for_ddim_run_on_its_own_spacing(embedding_build, learned, tmp_path):
    """DDIM rows are learned on 'trailing' spacing while the model's scheduler is 'linspace': the plan samples its
    own grid (the spacing is not part of the noise process; `run` refused such plans before) as the torch sampler."""
    from tmpdiff.calibration.mteo import embeddings_info

    distiller, s, _ = learned
    cfg = DistillConfig(solver="ddim", steps=STEPS, iterations=2, batch=4, train_samples=4, validation_samples=2,
                        reference_steps=8)
    result = distiller.distill(cfg, "trajectory", distiller.data(cfg))
    rows = tmp_path / "ddim.safetensors"
    save_time_embeddings(rows, result.tensor, embeddings_info(distiller, cfg, "tiny-dit", result.tensor, "trajectory",
                                                              [result.record]))
    assert cli("plan-embeddings", embedding_build, rows, "--out", tmp_path / "plan.json")[0] == 0
    got = _latents(embedding_build, tmp_path / "plan.json")
    sampler = FewStepSampler(distiller.model, STEPS, s.guidance_scale, distiller.conditioning, s.channels)
    with torch.no_grad():
        want = sampler.sample_states(make_scheduler("ddim", dict(s.scheduler_config)), torch.tensor([1, 7]),
                                     initial_noise(2, s.channels, s.image_size, 3), embeddings=result.tensor)[-1]
    assert (got - want).abs().max() < 1e-3


def test_plan_embeddings_refuses_what_run_would(embedding_build, learned, tmp_path):
    """Timesteps the solver does not sample at (5000 past 1000 training timesteps) are refused when the plan is
    written, as `run` would refuse them, and nothing is written; a NaN guidance scale cannot be read at all."""
    from safetensors.torch import load_file, save_file

    from tmpdiff.models.time_embeddings import load_time_embeddings

    _, _, files = learned
    _, info = load_time_embeddings(files["mteo"])
    tensors = load_file(str(files["mteo"]))
    moved = tmp_path / "moved.safetensors"
    save_file(tensors, str(moved), metadata={"tmpdiff": info.model_copy(
        update={"timesteps": [5000, *info.timesteps[1:]]}).model_dump_json()})
    code, _, err = cli("plan-embeddings", embedding_build, moved, "--out", tmp_path / "plan.json")
    assert code == 2 and "learned for timesteps [5000" in err and str(moved) in err, err
    assert not (tmp_path / "plan.json").exists()
    nan = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan), metadata={"tmpdiff": info.model_dump_json().replace(
        f'"guidance_scale":{info.guidance_scale}', '"guidance_scale":NaN')})
    code, _, err = cli("plan-embeddings", embedding_build, nan, "--out", tmp_path / "plan2.json")
    assert code == 2 and "guidance_scale" in err and not (tmp_path / "plan2.json").exists(), err
    # a schedule whose precisions were calibrated at other timesteps than the rows' (a --timesteps-from schedule)
    elsewhere = tmp_path / "elsewhere.json"
    other = [t - 1 for t in info.timesteps]
    elsewhere.write_text(Schedule(steps=info.steps, precisions=["fp32"] * info.steps, timesteps=other).model_dump_json())
    rows = tmp_path / "rows.safetensors"
    shutil.copy(files["mteo"], rows)
    code, _, err = cli("plan-embeddings", embedding_build, rows, "--schedule", elsewhere, "--out", tmp_path / "plan3.json")
    assert code == 2 and f"calibrated at timesteps {other}" in err and str(elsewhere) in err, err
    assert not (tmp_path / "plan3.json").exists()


def test_another_solvers_schedule_or_plan_is_refused_by_name(embedding_build, learned, tmp_path):
    """Precisions calibrated with another solver (its class, DPM-Solver's algorithm, or its spacing: a v1 schedule names
    no timesteps, its scheduler places them) are refused by plan-embeddings; a plan edited to another solver is refused
    by run even where the timesteps agree (1 step: DDIM 'trailing' and DPM-Solver++ both sample at [999])."""
    from tmpdiff.formats.schedule import SchedulerRef, save_schedule
    from tmpdiff.models.time_embeddings import load_time_embeddings

    distiller, s, files = learned
    rows = tmp_path / "rows.safetensors"
    shutil.copy(files["mteo"], rows)
    config = dict(s.scheduler_config)
    cases = [("ddim", "DDIMScheduler", {**config, "timestep_spacing": "trailing"}, "calibrated with DDIMScheduler"),
             ("dpm", "DPMSolverMultistepScheduler", {**config, "algorithm_type": "dpmsolver"},
              "calibrated with DPMSolverMultistepScheduler"),
             ("leading", s.scheduler_class, {**config, "timestep_spacing": "leading"}, "calibrated at timesteps"),
             ("same", s.scheduler_class, config, None)]
    for name, class_name, scheduler_config, refusal in cases:
        calibrated = tmp_path / f"{name}.json"
        save_schedule(Schedule(steps=STEPS, precisions=["int8"] * STEPS,
                               scheduler=SchedulerRef(class_name=class_name, config=scheduler_config)), calibrated)
        code, _, err = cli("plan-embeddings", embedding_build, rows, "--schedule", calibrated, "--out",
                           tmp_path / f"plan-{name}.json")
        if refusal is None:
            assert code == 0, err
            continue
        assert code == 2 and refusal in err and str(calibrated) in err and "\n" not in err.strip(), (name, err)
        assert not (tmp_path / f"plan-{name}.json").exists()
    # 1-step rows (the model's own) for DPM-Solver++, their plan edited to DDIM: same timesteps, other solver
    one = tmp_path / "one" / "one.safetensors"
    one.parent.mkdir()
    _, info = load_time_embeddings(files["mteo"])
    save_time_embeddings(one, own_embeddings(distiller.model, [999]),
                         info.model_copy(update={"steps": 1, "timesteps": [999], "trained_parameters": 5 * 192}))
    plan = one.parent / "plan.json"
    assert cli("plan-embeddings", embedding_build, one, "--out", plan)[0] == 0
    data = json.loads(plan.read_text())
    ddim = make_scheduler("ddim", config)  # DDIM 'trailing' at 1 step
    ddim.set_timesteps(1)
    assert [int(t) for t in ddim.timesteps] == [999]
    (one.parent / "ddim.json").write_text(json.dumps({**data, "scheduler": {
        "class_name": "DDIMScheduler", "config": {**data["scheduler"]["config"], "timestep_spacing": "trailing"}}}))
    code, _, err = _run(embedding_build, "--schedule", one.parent / "ddim.json", "--out", tmp_path / "x.png")
    assert code == 2 and "learned for dpmsolver++ (DPMSolverMultistepScheduler), the scheduler is DDIMScheduler" in err
    assert not (tmp_path / "x.png").exists()
    assert _run(embedding_build, "--schedule", plan, "--out", tmp_path / "y.png")[0] == 0  # the plan as written runs


def test_an_export_with_other_graph_inputs_does_not_drop_a_build_by_surprise(embedding_build, plain_build, bundled,
                                                                               tmp_path):
    """Exporting plain graphs into a --time-embedding-input build (or the reverse) starts the build over: refused when
    that drops an exported precision, built engines or deployed configurations, naming them; --force starts over."""
    from tmpdiff.export.exporter import export_model

    for source, embedding_input, dropped in [(embedding_build, False, "int8 (exported), 2 built engines"),
                                             (plain_build, True, "1 built engine")]:
        root = tmp_path / source.parent.name
        shutil.copytree(source.parent, root)
        before = (root / "tiny-dit" / "manifest.json").read_bytes()
        with pytest.raises(TmpdiffError, match=f"other inputs than the build's .* drop {re.escape(dropped)}: .* --force"):
            export_model(bundled.transformer_dir, root, ["fp32"], model_id="tiny-dit", sampling=sampling_info(bundled),
                         time_embedding_input=embedding_input)
        assert (root / "tiny-dit" / "manifest.json").read_bytes() == before
    build_dir, _ = export_model(bundled.transformer_dir, root, ["fp32"], model_id="tiny-dit",
                                sampling=sampling_info(bundled), time_embedding_input=True, replace=True)
    manifest = load_manifest(build_dir)
    assert manifest.time_embedding_input is not None and list(manifest.precisions) == ["fp32"] and not manifest.engines


def test_fp16_graphs_take_embeddings_and_a_new_table_is_recorded(bundled, tmp_path):
    """--time-embedding-input with fp16 (a 16-bit copy is probed with 16-bit inputs), and a table written again for
    other training timesteps (or after damage) is what the manifest records, so `check` passes."""
    from tmpdiff.export.exporter import export_model

    sampling = sampling_info(bundled)
    build_dir, outcomes = export_model(bundled.transformer_dir, tmp_path, ["fp32", "fp16"], model_id="m",
                                       sampling=sampling, time_embedding_input=True)
    assert [o.precision for o in outcomes] == ["fp32", "fp16"]
    fp16 = onnx.load(build_dir / "fp16" / "model.onnx", load_external_data=False)
    assert INPUT_NAME in [i.name for i in fp16.graph.input]
    other = sampling.model_copy(update={"scheduler_config": sampling.scheduler_config | {"num_train_timesteps": 500}})
    table = build_dir / load_manifest(build_dir).time_embedding_input.own_table
    table.write_bytes(table.read_bytes() + b"\0")  # damaged too: the table is written again either way
    export_model(bundled.transformer_dir, tmp_path, ["fp32"], model_id="m", sampling=other, time_embedding_input=True)
    entry = load_manifest(build_dir).time_embedding_input
    assert entry.train_timesteps == 500 and load_own_table(build_dir, load_manifest(build_dir)).shape[0] == 500
    code, out, _ = cli("check", build_dir)
    assert "own_time_embeddings" not in out, out


def test_calibrate_runs_on_graphs_that_take_time_embeddings(embedding_build, tmp_path):
    """calibrate samples with the build's own table, as run does (it refused such builds, asking for the table), and
    the schedule it writes runs."""
    costs = tmp_path / "costs.json"
    assert cli("costs", "--device", "d", "--ratio", "fp32=1,int8=0.6", "--source", "test", "--out", costs)[0] == 0
    schedule = tmp_path / "schedule.json"
    code, _, err = cli("calibrate", embedding_build, "--costs", costs, "--speedup", "1.2", "--steps", str(STEPS),
                       "--calib-seeds", "0", "--out", schedule)
    assert code == 0, err
    file = load_schedule(schedule)
    assert file.steps == STEPS and "int8" in file.precisions
    assert torch.isfinite(_latents(embedding_build, schedule)).all()
