"""Fuzzed schedule and costs files: a clear TmpdiffError or a valid object, never a traceback; nothing written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmpdiff.commands.check import check_build
from tmpdiff.formats.costs import load_costs
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.schedule import Schedule, load_schedule

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=20)
precision_names = st.sampled_from(["fp32", "fp16", "int8", "fp8", "int4", "int3", "", "FP32"])
schedule_like = st.fixed_dictionaries(
    {"format": st.sampled_from(["tmpdiff.schedule/1", "tmpdiff.schedule/2", 7]),
     "steps": st.one_of(st.integers(min_value=-5, max_value=10**9), st.floats(allow_nan=True), st.text(max_size=3)),
     "precisions": st.one_of(st.lists(precision_names, max_size=12), json_values)},
    optional={"reference": precision_names, "evaluations": json_values, "predicted": json_values},
)


def _dump(value) -> str:
    return json.dumps(value, allow_nan=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.one_of(schedule_like, json_values))
def test_fuzzed_schedules(tmp_path, document):
    path = tmp_path / "schedule.json"
    path.write_text(_dump(document))
    before = path.read_bytes()
    try:
        schedule = load_schedule(path)
    except TmpdiffError as exc:
        assert "schedule.json" in str(exc)
    else:
        assert isinstance(schedule, Schedule) and len(schedule.precisions) == schedule.steps
    assert path.read_bytes() == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.one_of(json_values, st.fixed_dictionaries({
    "format": st.just("tmpdiff.costs/1"), "model_id": st.text(max_size=5), "backend": st.just("ort"),
    "backend_version": st.just("1"), "device": st.just("cpu"), "batch": st.integers(-2, 4), "warmup": st.integers(-1, 2),
    "measured_at": st.just("now"),
    "precisions": st.dictionaries(precision_names, st.fixed_dictionaries({
        "median_ms": st.floats(allow_nan=True, allow_infinity=True), "p10_ms": st.floats(0.1, 2),
        "p90_ms": st.floats(0.1, 2), "repeats": st.integers(0, 3)}), max_size=3)})))
def test_fuzzed_costs(tmp_path, document):
    path = tmp_path / "costs.json"
    path.write_text(_dump(document))
    try:
        table = load_costs(path)
    except TmpdiffError as exc:
        assert "costs.json" in str(exc)
    else:
        assert table.precisions and all(math.isfinite(c.median_ms) and c.median_ms > 0 for c in table.precisions.values())


@pytest.mark.parametrize("payload", [b"", b"\xff\xfe", b"{", b"[]", b"null", b"[" * 100_000])
def test_garbage_files(tmp_path, payload):
    for loader, name in ((load_schedule, "schedule.json"), (load_costs, "costs.json")):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(TmpdiffError, match=name):  # deep nesting too: a RecursionError inside json before
            loader(tmp_path / name)


def test_deeply_nested_model_info_is_refused_by_name(tmp_path, bundled):
    """A class-conditional model directory's tmpdiff_model.json nested 100000 deep was a RecursionError."""
    import shutil

    from tmpdiff.models.bundled import load_model_info

    shutil.copytree(bundled.root, tmp_path / "m")
    (tmp_path / "m" / "tmpdiff_model.json").write_text("[" * 100_000)
    with pytest.raises(TmpdiffError, match="tmpdiff_model.json: not a valid JSON document: nested too deeply"):
        load_model_info(tmp_path / "m")


def test_files_that_parse_but_cannot_work_are_refused_by_name(tmp_path):
    """Each of these once passed validation and failed later with a traceback (a review's findings)."""
    from tmpdiff.formats.layer_costs import load_layer_costs
    from tmpdiff.formats.time_embeddings import TimeEmbeddingsInfo
    from tmpdiff.runtime.plan import resolve_plan

    def refused(name: str, document: dict, loader, *phrases: str) -> None:
        path = tmp_path / name
        path.write_text(json.dumps(document, allow_nan=True))
        with pytest.raises(TmpdiffError) as info:
            loader(path)
        assert name in str(info.value) and all(p in str(info.value) for p in phrases), str(info.value)

    stated = {"format": "tmpdiff.costs/1", "origin": "stated", "device": "d", "source": "s",
              "precisions": {"fp32": {"ratio": 1e10}, "int8": {"ratio": 1e-300}}}
    refused("costs.json", stated, load_costs, "over 1e+06 times")  # each finite, no speedup from them is
    stated["precisions"] = {"fp32": {"ratio": 1e308}, "int8": {"ratio": 1e307}}  # 10x apart, but no sum is finite
    refused("costs.json", stated, load_costs, "a step cost of 1e+308 is over 1e+12")
    schedule = {"format": "tmpdiff.schedule/2", "steps": 2, "precisions": ["fp32", "int8"],
                "scheduler": {"class_name": "DPMSolverMultistepScheduler", "config": {"solver_order": 0}}}
    refused("schedule.json", schedule, load_schedule, "solver_order must be an integer >= 1")
    schedule["scheduler"]["config"] = {"num_train_timesteps": "abc"}
    refused("schedule.json", schedule, load_schedule, "num_train_timesteps")
    layer = {"name": "a", "macs": 1, "ms": {"fp32": 1.0, "int8": float("nan")}}
    layer_costs = {"format": "tmpdiff.layer-costs/1", "model_id": "m", "backend": "ort", "backend_version": "1",
                   "device": "cpu", "batch": 2, "repeats": 1, "precisions": ["fp32", "int8"], "layers": [layer],
                   "rest_ms": {"fp32": 1.0, "int8": 1.0}, "step_ms": {"fp32": 2.0, "int8": 1.5}}
    refused("layer_costs.json", layer_costs, load_layer_costs, "layers.0.ms.int8: NaN or Infinity")
    layer["ms"]["int8"] = 0.5
    layer_costs["rest_ms"] = {"int8": 1.0}  # nothing for the base precision every configuration pays
    refused("layer_costs.json", layer_costs, load_layer_costs, "rest_ms", "fp32")
    layer["ms"]["fp32"] = 0.0  # fp32 all zeros: the search divided by the reference's (and a plan's) cost at its end
    layer_costs["rest_ms"] = {"fp32": 0.0, "int8": 1.0}
    refused("layer_costs.json", layer_costs, load_layer_costs, "would cost 0 ms")
    with pytest.raises(ValueError, match="solver"):
        TimeEmbeddingsInfo.model_validate({"kind": "mteo", "solver": "bogus"})
    with pytest.raises(TmpdiffError, match="1..10000"):
        resolve_plan(precision="fp32", steps=10**30)  # refused before a per-step list of that length is built


def test_a_huge_num_train_timesteps_is_refused_before_a_scheduler_is_made(tmp_path):
    """10**10 training timesteps: diffusers' beta loop ran for minutes in `check --schedule` and `run`, then a
    MemoryError; refused when the schedule is read, and for a config from anywhere else (a pipeline directory's)."""
    from tmpdiff.models.schedulers import scheduler_from

    config = {"num_train_timesteps": 10**10, "beta_schedule": "squaredcos_cap_v2"}
    path = tmp_path / "bigtrain.json"
    path.write_text(json.dumps({"format": "tmpdiff.schedule/1", "steps": 2, "precisions": ["fp32", "fp32"],
                                "scheduler": {"class_name": "DPMSolverMultistepScheduler", "config": config}}))
    with pytest.raises(TmpdiffError, match="num_train_timesteps must be at most 100,000, got 10,000,000,000"):
        load_schedule(path)
    with pytest.raises(TmpdiffError, match="num_train_timesteps must be at most 100,000"):
        scheduler_from("DPMSolverMultistepScheduler", config | {"num_train_timesteps": 10**6})
    scheduler_from("DPMSolverMultistepScheduler", config | {"num_train_timesteps": 4000})  # a real model's count


def test_a_huge_solver_order_is_refused_before_a_scheduler_is_made(tmp_path):
    """solver_order 10**9: a multistep solver allocates a history list of that length when it is made (8 GB);
    refused when the schedule is read and for a pipeline directory's config. An order up to the most steps a run
    takes is kept: UniPC takes any order."""
    from tmpdiff.formats.config_values import MAX_SOLVER_ORDER
    from tmpdiff.formats.schedule import MAX_STEPS
    from tmpdiff.models.schedulers import scheduler_from

    assert MAX_SOLVER_ORDER == MAX_STEPS
    path = tmp_path / "order.json"
    path.write_text(json.dumps({"format": "tmpdiff.schedule/1", "steps": 2, "precisions": ["fp32", "fp32"],
                                "scheduler": {"class_name": "UniPCMultistepScheduler",
                                              "config": {"solver_order": 10**9}}}))
    with pytest.raises(TmpdiffError, match="solver_order must be at most 10,000, got 1,000,000,000"):
        load_schedule(path)
    with pytest.raises(TmpdiffError, match="solver_order must be at most 10,000"):
        scheduler_from("UniPCMultistepScheduler", {"solver_order": 10**5})
    assert scheduler_from("UniPCMultistepScheduler", {"solver_order": 4}).config.solver_order == 4


def test_check_refuses_a_step_count_run_refuses(quant_build, tmp_path):
    """1000 DPM-Solver steps repeat a timestep: `run` refused the schedule, `check --schedule` passed it."""
    from tests.cli_helpers import cli
    from tmpdiff.formats.schedule import save_schedule

    _, build_dir, _ = quant_build
    path = tmp_path / "many.json"
    save_schedule(Schedule(steps=1000, precisions=["fp32"] * 1000), path)
    message = "DPMSolverMultistepScheduler repeats timesteps at 1000 steps"
    problems = [str(p) for p in check_build(build_dir, [path], spot_check=False)]
    assert len(problems) == 1 and problems[0].startswith(f"{path}: {message}"), problems
    code, _, err = cli("run", build_dir, "--schedule", path, "--out", tmp_path / "x.png")
    assert code == 2 and message in err, err


def test_check_names_every_problem(quant_build, tmp_path):
    import shutil

    _, build_dir, _ = quant_build
    assert check_build(build_dir) == []
    copy = tmp_path / "b"
    shutil.copytree(build_dir, copy)
    (copy / "int8" / "model.onnx").unlink()
    data = (copy / "fp16" / "model.onnx").read_bytes()
    (copy / "fp16" / "model.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "bad_schedule.json").write_text(json.dumps({"format": "tmpdiff.schedule/1", "steps": 2, "precisions": ["fp32", "int8-sq"],
                                                                 "reference": "fp32"}))
    problems = [str(p) for p in check_build(copy, [tmp_path / "bad_schedule.json"])]
    assert any("int8: file is missing" in p for p in problems)
    assert any("fp16: sha256 does not match" in p for p in problems)
    assert any("uses int8-sq, not exported here" in p for p in problems)
    assert all("->" in p for p in problems)


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"[1,2]", b"{}"])
def test_quantizer_state_is_checked_before_the_supernet_reads_it(quant_build, tmp_path, payload):
    """layer-costs, search-plan and deploy-plan restore the quantizers from a precision's quant_config.json: an edited
    one is refused by its manifest hash (`{}` once measured another network); with the hash updated to match, a file
    that cannot be read is still one TmpdiffError naming it (it was a UnicodeDecodeError / AttributeError)."""
    import shutil

    from tests.cli_helpers import cli
    from tmpdiff.export.supernet import supernet_from_build
    from tmpdiff.formats.atomic import sha256_file
    from tmpdiff.formats.manifest import load_manifest, save_manifest
    from tmpdiff.models.bundled import bundled_dir

    copy = tmp_path / "b"
    shutil.copytree(quant_build[1], copy)
    config = copy / "int8" / "quant_config.json"
    config.write_bytes(payload)
    code, _, err = cli("layer-costs", copy, "--precisions", "int8", "--out", tmp_path / "costs.json")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "quant_config.json: int8: sha256 does not match the manifest" in err
    assert not (tmp_path / "costs.json").exists()
    if payload == b"{}":
        return
    manifest = load_manifest(copy)
    manifest.precisions["int8"].artifacts["int8/quant_config.json"] = sha256_file(config)
    save_manifest(copy, manifest)
    with pytest.raises(TmpdiffError, match="quant_config.json: (not valid UTF-8|expected a JSON object)"):
        supernet_from_build(copy, bundled_dir() / "transformer", ["int8"])


def test_layer_costs_names_an_engine_onnx_runtime_cannot_load(quant_build, tmp_path):
    """A truncated engine whose manifest hash was rewritten to match: run, profile and calibrate named it, layer-costs
    gave ONNX Runtime's InvalidProtobuf traceback."""
    import shutil

    from tests.cli_helpers import cli
    from tmpdiff.formats.atomic import sha256_file
    from tmpdiff.formats.manifest import engine_key, load_manifest, save_manifest

    copy = tmp_path / "b"
    shutil.copytree(quant_build[1], copy)
    manifest = load_manifest(copy)
    engine = manifest.engines[engine_key("ort", "cpu", "int8")]
    path = copy / engine.path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    engine.sha256 = sha256_file(path)
    save_manifest(copy, manifest)
    code, _, err = cli("layer-costs", copy, "--precisions", "int8", "--batch", "1", "--warmup", "0", "--repeats", "1",
                       "--out", tmp_path / "costs.json")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: "), err
    assert f"{engine.path}: ONNX Runtime cannot load this model" in err and "Traceback" not in err
    assert not (tmp_path / "costs.json").exists()


def test_layer_costs_checks_threads_and_memory_and_records_its_threads(quant_build, tmp_path, monkeypatch):
    """layer-costs refused neither --threads past the usable cores nor a --batch past the memory (it ran until ONNX
    Runtime's allocation failed, with a traceback); its table records the threads it measured with."""
    import os

    from tests.cli_helpers import cli
    from tmpdiff.engines import memory
    from tmpdiff.formats.layer_costs import load_layer_costs

    args = ["layer-costs", quant_build[1], "--precisions", "int8", "--warmup", "0", "--repeats", "1"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one usable core, whatever the machine has
    code, _, err = cli(*args, "--threads", "2", "--out", tmp_path / "a.json")
    assert code == 2 and "--threads must be in 1..1 (the cores this process may use), got 2" in err, err
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    code, _, err = cli(*args, "--batch", "1000", "--out", tmp_path / "b.json")
    assert code == 2 and "--batch" in err and "is available" in err and "Traceback" not in err, err
    monkeypatch.undo()
    code, _, err = cli(*args, "--batch", "1", "--threads", "1", "--out", tmp_path / "c.json")
    assert code == 0, err
    assert load_layer_costs(tmp_path / "c.json").threads == 1
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_duplicate_keys_and_overlong_integers_are_refused_by_name(tmp_path, bundled):
    """A key given twice (Python kept the last one silently; other parsers keep the first) and an integer past
    Python's digit limit (a ValueError traceback) in a schedule, a model config or a manifest."""
    from tmpdiff.formats.atomic import read_json_object

    schedule = tmp_path / "schedule.json"
    schedule.write_text('{"format": "tmpdiff.schedule/1", "steps": 2, "precisions": ["fp32", "fp32"], '
                        '"precisions": ["int8", "int8"]}')
    with pytest.raises(TmpdiffError, match="schedule.json: not valid JSON .key 'precisions' appears twice"):
        load_schedule(schedule)
    schedule.write_text('{"format": "tmpdiff.schedule/1", "steps": ' + "9" * 5000 + ', "precisions": ["fp32"]}')
    with pytest.raises(TmpdiffError, match="schedule.json: not valid JSON .*digits"):
        load_schedule(schedule)
    config = tmp_path / "config.json"
    config.write_text('{"sample_size": 16, "nested": {"a": 1, "a": 2}}')
    with pytest.raises(TmpdiffError, match="config.json: not valid JSON .key 'a' appears twice"):
        read_json_object(config)


def test_a_schedules_guidance_scale_must_be_a_number(tmp_path):
    """run --pipeline held a run to the schedule's target.guidance_scale: "abc" was a ValueError traceback there,
    true ran as 1.0."""
    for scale in ("abc", True, None, 4.5):
        path = tmp_path / "schedule.json"
        path.write_text(json.dumps({"format": "tmpdiff.schedule/1", "steps": 1, "precisions": ["fp32"],
                                    "target": {"guidance_scale": scale}}))
        if scale in ("abc", True):
            with pytest.raises(TmpdiffError, match="target.guidance_scale must be a finite number"):
                load_schedule(path)
        else:
            assert load_schedule(path).target["guidance_scale"] == scale


def test_measured_costs_tables_are_checked_like_stated_ones(tmp_path):
    """Unknown precision names and numbers in quotes were read from a measured table. (Percentiles are not held to
    their median: pinning a median by hand, as tests do to fix a ratio, is a use.)"""
    def measured(**changes):
        table = {"format": "tmpdiff.costs/1", "origin": "measured", "device": "cpu: x", "backend": "ort", "model_id": "m",
                 "backend_version": "1", "batch": 8, "warmup": 1, "measured_at": "now",
                 "precisions": {"fp32": {"median_ms": 2.0, "p10_ms": 1.9, "p90_ms": 2.2, "repeats": 3},
                                "int8": {"median_ms": 1.0, "p10_ms": 0.9, "p90_ms": 1.1, "repeats": 3}}}
        return table | changes

    path = tmp_path / "costs.json"
    path.write_text(json.dumps(measured()))
    assert load_costs(path).precisions["int8"].median_ms == 1.0
    bad_int8 = {"median_ms": 1.0, "p10_ms": 1.2, "p90_ms": 1.1, "repeats": 3}
    for changes, phrase in (({"precisions": measured()["precisions"] | {"fp7": bad_int8 | {"p10_ms": 0.9}}},
                             "unknown precision fp7"),
                            ({"batch": "8"}, "batch"), ({"warmup": 1.0}, "warmup")):
        path.write_text(json.dumps(measured(**changes)))
        with pytest.raises(TmpdiffError, match=f"costs.json: .*{phrase}"):
            load_costs(path)


def test_a_set_and_itself_are_at_distance_0_and_identical_images_count_as_the_cap():
    """FD(X, X) was +-3e-8 of rounding (reported with an interval reaching below 0); the mean PSNR of a batch with one
    image identical to its reference was inf (the documented cap of 100 dB was applied only per sample elsewhere)."""
    import torch

    from tmpdiff.eval.bootstrap import jackknife_ci
    from tmpdiff.eval.metrics import PSNR_CAP_DB, image_metrics
    from tmpdiff.eval.quality import frechet_distance
    from tmpdiff.eval.rgb import mean_rgb_metrics

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 32))
    assert frechet_distance(x, x) == 0.0 and frechet_distance(x, x + 1e-3) >= 0.0
    interval = jackknife_ci(lambda keep: frechet_distance(x[keep], x[keep]), 20, positive=True)
    assert (interval.value, interval.low, interval.high) == (0.0, 0.0, 0.0)
    images = rng.uniform(size=(2, 8, 8))
    other = images.copy()
    other[1] = np.clip(other[1] + 0.01, 0, 1)
    ssim, psnr = image_metrics(other, images)
    assert np.isfinite(psnr) and psnr > 30 and (psnr - PSNR_CAP_DB) < 0
    assert image_metrics(images, images)[1] == float("inf")  # every image identical: inf, as documented
    t = torch.rand(2, 3, 16, 16)
    r = t.clone()
    r[1] = (r[1] + 0.01).clamp(0, 1)
    assert np.isfinite(mean_rgb_metrics(t, r)[1])
