"""The schedule-driven runtime: engine switching on shared buffers, NaN fallback, bad input, traces, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.cli_helpers import cli_run
from tmpdiff.commands.run import RunRequest, run
from tmpdiff.engines.loading import load_engines
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.formats.precisions import next_higher
from tmpdiff.formats.schedule import Schedule, save_schedule
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise


def _runner(build_dir, precisions, batch=2, **kwargs):
    manifest = load_manifest(build_dir)
    s = manifest.sampling
    engines = load_engines(build_dir, manifest, "ort", "cpu", precisions)
    return manifest, ScheduledRunner(engines, batch, s.channels, s.image_size, s.guidance_scale, s.null_class,
                                     s.num_classes, **kwargs)


def test_runner_matches_a_direct_diffusers_loop(quant_build, bundled):
    """The runner (bound buffers, in-place copies, CFG in one batch) against the textbook diffusers loop written
    here with host arrays: same noise, same scheduler, same graph."""
    from tmpdiff.engines.ort import OrtEngine

    _, build_dir, _ = quant_build
    manifest, runner = _runner(build_dir, ["fp32"])
    labels, noise = torch.tensor([3, 7]), initial_noise(2, 1, bundled.image_size, seed=4)
    got = runner.sample(sampling_scheduler(manifest.sampling), labels, noise, ["fp32"] * 10).latents

    engine, scheduler = OrtEngine(build_dir / "fp32/model.onnx"), sampling_scheduler(manifest.sampling)
    scheduler.set_timesteps(10)
    latent, both = noise * scheduler.init_noise_sigma, torch.cat([labels, torch.full_like(labels, bundled.num_classes)])
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latent, latent]), t)
        eps = torch.from_numpy(engine.infer({"hidden_states": model_in.numpy(), "class_labels": both.numpy(),
                                             "timestep": np.full(4, float(t), np.float32)})["noise_pred"])
        cond, uncond = eps.chunk(2)
        latent = scheduler.step(uncond + bundled.guidance_scale * (cond - uncond), t, latent).prev_sample
    assert (got - latent).abs().max().item() < 1e-4


def test_mixed_schedule_runs_the_named_engines(quant_build, bundled):
    _, build_dir, _ = quant_build
    schedule = ["fp32", "int8", "int8", "fp16", "int4", "fp8", "fp32", "int8", "int4", "fp32"]
    manifest, runner = _runner(build_dir, ["fp32", "fp16", "int8", "fp8", "int4"])
    result = runner.sample(sampling_scheduler(manifest.sampling), torch.tensor([1, 2]),
                           initial_noise(2, 1, bundled.image_size, 0), schedule)
    assert [e.precision for e in result.trace.steps] == schedule
    assert result.trace.switches == 8 and not result.trace.fallbacks
    assert torch.isfinite(result.latents).all()
    uniform = runner.sample(sampling_scheduler(manifest.sampling), torch.tensor([1, 2]),
                            initial_noise(2, 1, bundled.image_size, 0), ["fp32"] * 10).latents
    assert 0 < (result.latents - uniform).abs().max().item() < 0.5  # quantized steps changed the result a little


def test_same_seed_same_schedule_is_bit_identical(quant_build, bundled):
    _, build_dir, _ = quant_build
    manifest, runner = _runner(build_dir, ["fp32", "int8"])
    runs = [runner.sample(sampling_scheduler(manifest.sampling), torch.tensor([5, 6]),
                          initial_noise(2, 1, bundled.image_size, 9), ["int8", "fp32"] * 5).latents for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


_LATENT_DIGEST = """
import hashlib, sys
from pathlib import Path
from tmpdiff.commands.run import RunRequest, run
result, _, _ = run(RunRequest(build_dir=Path(sys.argv[1]), classes=[5, 6], seed=9, steps=10, schedule_path=Path(sys.argv[2])))
print(hashlib.sha256(result.latents.numpy().tobytes()).hexdigest())
"""


def test_same_seed_same_schedule_is_bit_identical_across_processes(quant_build, tmp_path):
    """Fresh processes (own ORT thread pool and arena each) give the same latents bit for bit."""
    _, build_dir, _ = quant_build
    save_schedule(Schedule(steps=10, precisions=["int8", "fp32"] * 5), tmp_path / "schedule.json")
    digests = [subprocess.run([sys.executable, "-c", _LATENT_DIGEST, str(build_dir), str(tmp_path / "schedule.json")],
                              capture_output=True, text=True, timeout=300, check=True).stdout.strip() for _ in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


class _NaNAfter:
    """Wraps an engine so its output turns NaN (what an overflowing low-precision engine does)."""

    def __init__(self, engine) -> None:
        self.engine, self.precision, self.device = engine, engine.precision, engine.device
        self.input_specs, self.output_specs = engine.input_specs, engine.output_specs

    def bind(self, inputs, outputs):
        self.outputs = outputs
        self.engine.bind(inputs, outputs)

    def run(self, stream):
        self.engine.run(stream)
        self.outputs["noise_pred"][0, 0, 0, 0] = float("nan")

    def unbind(self):
        self.engine.unbind()

    def close(self):
        self.engine.close()


def test_nan_step_falls_back_to_higher_precision(quant_build, bundled):
    _, build_dir, _ = quant_build
    manifest = load_manifest(build_dir)
    engines = load_engines(build_dir, manifest, "ort", "cpu", ["fp32", "fp16", "int8"])
    engines["int8"] = _NaNAfter(engines["int8"])
    s = manifest.sampling
    runner = ScheduledRunner(engines, 2, s.channels, s.image_size, s.guidance_scale, s.null_class, s.num_classes)
    result = runner.sample(sampling_scheduler(s), torch.tensor([0, 1]), initial_noise(2, 1, s.image_size, 0),
                           ["fp32", "int8", "fp32", "int8"])
    assert [(e.precision, e.fallback_from) for e in result.trace.steps] == [
        ("fp32", None), ("fp16", "int8"), ("fp32", None), ("fp16", "int8")]
    assert torch.isfinite(result.latents).all()
    assert next_higher("int4", ["fp32", "int8"]) == "int8" and next_higher("fp32", ["fp32"]) is None


def test_trace_has_one_event_per_step_and_switches(quant_build, tmp_path, bundled):
    _, build_dir, _ = quant_build
    manifest, runner = _runner(build_dir, ["fp32", "int8"])
    result = runner.sample(sampling_scheduler(manifest.sampling), torch.tensor([0, 1]),
                           initial_noise(2, 1, bundled.image_size, 0), ["fp32", "fp32", "int8", "fp32"])
    result.trace.write_chrome_trace(tmp_path / "trace.json")
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert [e["name"] for e in events if e["ph"] == "X"] == ["step 0 fp32", "step 1 fp32", "step 2 int8", "step 3 fp32"]
    assert [e["name"] for e in events if e["ph"] == "i"] == ["switch fp32 -> int8", "switch int8 -> fp32"]


@pytest.mark.parametrize(
    ("schedule", "request_kwargs", "message"),
    [
        ({"steps": 4, "precisions": ["fp32"] * 4}, {"steps": 5}, "schedule has 4 steps but --steps 5"),
        ({"steps": 4, "precisions": ["fp32"] * 3}, {}, "3 precisions for 4 steps"),
        ({"steps": 2, "precisions": ["fp32", "int3"]}, {}, "unknown precision int3"),
        ({"steps": 2, "precisions": ["fp32", "int8-sq"]}, {}, "uses int8-sq but only"),
        ({"steps": 2, "precisions": ["fp32", "fp32"]}, {"classes": [10]}, "class ids must be in 0..9"),
        ({"steps": 2, "precisions": ["fp32", "fp32"]}, {"classes": []}, "class ids must be in 0..9"),
    ],
)
def test_bad_runs_fail_before_the_first_step(quant_build, tmp_path, schedule, request_kwargs, message):
    _, build_dir, _ = quant_build
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"format": "tmpdiff.schedule/1", **schedule}))
    steps_run = []
    request = RunRequest(build_dir=build_dir, classes=request_kwargs.pop("classes", [0]), schedule_path=path, **request_kwargs)
    with pytest.raises(TmpdiffError, match=message):
        run(request, on_step=steps_run.append)
    assert steps_run == []


def test_buffers_of_wrong_shape_are_refused(quant_build):
    _, build_dir, _ = quant_build
    manifest = load_manifest(build_dir)
    engine = load_engines(build_dir, manifest, "ort", "cpu", ["fp32"])["fp32"]
    inputs = {"hidden_states": torch.zeros(2, 1, 8, 8), "timestep": torch.zeros(2), "class_labels": torch.zeros(2, dtype=torch.int64)}
    with pytest.raises(TmpdiffError, match=r"hidden_states buffer has shape \(2, 1, 8, 8\)"):
        engine.bind(inputs, {"noise_pred": torch.zeros(2, 1, 16, 16)})
    inputs["hidden_states"] = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    with pytest.raises(TmpdiffError, match="hidden_states buffer is torch.float64"):
        engine.bind(inputs, {"noise_pred": torch.zeros(2, 1, 16, 16)})


def test_cli_run_mixed_schedule(quant_build, tmp_path):
    _, build_dir, _ = quant_build
    schedule = Schedule(steps=6, precisions=["fp32", "int8", "int8", "int4", "fp32", "fp32"])
    save_schedule(schedule, tmp_path / "schedule.json")
    result = cli_run("run", build_dir, "--schedule", tmp_path / "schedule.json", "--class", "3,8", "--out",
                     tmp_path / "img.png", "--trace", tmp_path / "trace.json")
    assert result.returncode == 0, result.stderr
    assert "int4" in result.stdout and "engine switches" in result.stdout
    assert (tmp_path / "img.png").stat().st_size > 0 and (tmp_path / "trace.json").is_file()
    bad = cli_run("run", build_dir, "--schedule", tmp_path / "schedule.json", "--steps", "20")
    assert bad.returncode == 2 and "schedule has 6 steps" in bad.stderr and "Traceback" not in bad.stderr


def test_profile_writes_costs_for_every_engine(quant_build, tmp_path):
    from tmpdiff.engines.device import device_label
    from tmpdiff.engines.profile import profile_build
    from tmpdiff.formats.costs import load_costs, save_costs

    _, build_dir, _ = quant_build
    manifest = load_manifest(build_dir)
    table = profile_build(build_dir, "ort", "cpu", batch=4, warmup=1, repeats=5)
    # exactly the precisions with an ORT-CPU engine, each measured as often as asked
    assert list(table.precisions) == manifest.built_precisions("ort", "cpu") == ["fp32", "fp16", "int8", "fp8", "int4"]
    assert all(c.repeats == 5 for c in table.precisions.values())
    assert (table.backend, table.device, table.batch, table.warmup, table.model_id) == (
        "ort", device_label("cpu"), 4, 1, manifest.model_id)
    assert table.backend_version == manifest.engines["ort:cpu:fp32"].backend_version
    save_costs(table, tmp_path / "costs.json")
    assert load_costs(tmp_path / "costs.json") == table
    # int8 is cheaper than fp32 on this CPU: 0.62-0.76x of fp32 at batch 4 in 10 profiles (idle and under load)
    assert table.precisions["int8"].median_ms < 0.9 * table.precisions["fp32"].median_ms, table.relative()


def test_without_guidance_the_scheduler_never_keeps_the_engines_output_buffer(quant_build, tmp_path, monkeypatch):
    """At guidance 1 the model output went to `scheduler.step` as the bound buffer itself: PNDM keeps it in its history
    and the next engine call overwrote it in place (0.27 max abs difference in the latents). The same run with the
    scheduler handed copies must give the same latents."""
    from diffusers import PNDMScheduler

    from tmpdiff.formats.manifest import load_manifest
    from tmpdiff.formats.schedule import SchedulerRef

    _, build_dir, _ = quant_build
    pndm = SchedulerRef(class_name="PNDMScheduler", config=load_manifest(build_dir).sampling.scheduler_config
                        | {"skip_prk_steps": True})
    save_schedule(Schedule(steps=6, precisions=["fp32"] * 6, scheduler=pndm), tmp_path / "pndm.json")

    def latents():
        return run(RunRequest(build_dir=build_dir, classes=[1, 2], schedule_path=tmp_path / "pndm.json",
                              guidance_scale=1.0))[0].latents

    shipped = latents()
    step = PNDMScheduler.step
    monkeypatch.setattr(PNDMScheduler, "step", lambda self, output, *a, **k: step(self, output.clone(), *a, **k))
    assert torch.equal(shipped, latents())


def test_zero_steps_is_refused_not_taken_for_the_default():
    from tmpdiff.runtime.plan import resolve_plan

    assert resolve_plan(None, "int8", steps=None, default_steps=20).steps == 20
    with pytest.raises(TmpdiffError, match="0 steps: a run takes 1.."):
        resolve_plan(None, "int8", steps=0, default_steps=20)


def test_a_closed_runner_refuses_to_sample_and_a_failed_load_frees_what_it_loaded(quant_build, monkeypatch):
    """An ORT engine still ran after its runner's close (nothing said the runner was done); engines loaded before a
    later precision failed to load were left open."""
    from tmpdiff.engines import loading

    _, build_dir, _ = quant_build
    manifest = load_manifest(build_dir)
    sampling = manifest.sampling
    engines = load_engines(build_dir, manifest, "ort", "cpu", ["fp32"])
    runner = ScheduledRunner(engines, batch=1, channels=sampling.channels, size=sampling.image_size, guidance_scale=1.0,
                             null_class=sampling.null_class, num_classes=sampling.num_classes, owns_engines=True)
    runner.close()
    with pytest.raises(TmpdiffError, match="the runner was closed"):
        runner.sample(sampling_scheduler(sampling), torch.tensor([1]),
                      initial_noise(1, sampling.channels, sampling.image_size, 0), ["fp32", "fp32"])
    closed: list[str] = []
    real = loading.load_engines.__globals__["_current_engine"]

    def current(build, man, backend, device, name):
        if name == "int8":
            raise TmpdiffError("int8 refused for the test")
        return real(build, man, backend, device, name)

    monkeypatch.setattr(loading, "_current_engine", current)
    from tmpdiff.engines.ort import OrtEngine

    close = OrtEngine.close
    monkeypatch.setattr(OrtEngine, "close", lambda self: closed.append(self.path.parent.name) or close(self))
    with pytest.raises(TmpdiffError, match="int8 refused"):
        load_engines(build_dir, manifest, "ort", "cpu", ["fp32", "int8"])
    assert closed == ["fp32"]


def test_a_scheduler_without_zero_snr_rescaling_runs_the_unrescaled_process():
    """Heun has no rescale_betas_zero_snr key: that is the process of a scheduler configured False (it was refused as
    'None vs False'), not that of one configured True."""
    from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler

    from tmpdiff.models.schedulers import check_noise_process

    process = {"prediction_type": "v_prediction", "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear"}
    heun = HeunDiscreteScheduler(**process)
    assert "rescale_betas_zero_snr" not in heun.config
    check_noise_process(heun, DPMSolverMultistepScheduler(**process).config, "Heun", "DPM", None)
    with pytest.raises(TmpdiffError, match="rescale_betas_zero_snr: False vs True"):
        check_noise_process(heun, DPMSolverMultistepScheduler(**process, rescale_betas_zero_snr=True).config, "Heun",
                            "DPM", None)


def test_call_memo_keys_numpy_inputs_by_their_bytes():
    # repr() of a numpy array of over 1,000 elements elides its middle: two calls differing there shared a key
    import numpy as np

    from tmpdiff.runtime.call_memo import digest

    a = np.zeros(2000, dtype=np.float32)
    b = a.copy()
    b[1000] = 1.0
    assert f"{a!r}" == f"{b!r}"  # what the key was made of
    assert digest(0, "int8", {"x": a}) != digest(0, "int8", {"x": b})
    assert digest(0, "int8", {"x": a}) == digest(0, "int8", {"x": a.copy()})
    assert digest(0, "int8", {"x": np.asfortranarray(np.ones((3, 4)))}) == digest(0, "int8", {"x": np.ones((3, 4))})


def test_buffers_of_every_dtype_a_tensorrt_engine_names_are_checked():
    # TensorRT names BOOL / INT8 / UINT8 I/O; without a torch dtype for them a right buffer was refused as wrong
    from tmpdiff.engines.base import check_buffers
    from tmpdiff.formats.specs import TensorSpec

    for name, dtype in (("bool", torch.bool), ("int8", torch.int8), ("uint8", torch.uint8)):
        check_buffers("engine", [TensorSpec("mask", name, ("batch", 4))], {"mask": torch.zeros(2, 4, dtype=dtype)})
        with pytest.raises(TmpdiffError, match=f"mask buffer is torch.float32, engine expects {name}"):
            check_buffers("engine", [TensorSpec("mask", name, ("batch", 4))], {"mask": torch.zeros(2, 4)})
