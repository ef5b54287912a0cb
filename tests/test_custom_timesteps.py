"""Timestep selection: a `tmpdiff.schedule/2` file names the training timestep of every step, and the runtime, the
CLI and the diffusers drop-in sample at exactly those (recorded where the engines read them), or refuse in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests import tiny_pipelines
from tests.cli_helpers import cli_run
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.schedule import Schedule, SchedulerRef, load_schedule, save_schedule

TIMESTEPS = [999, 870, 640, 455, 260, 95, 12]  # 7 steps: not the bundled model's 20, not any scheduler's own spacing
PRECISIONS = ["fp32", "fp16", "fp16", "fp32", "fp16", "fp32", "fp32"]


def _v2(path, timesteps=TIMESTEPS, precisions=PRECISIONS, **extra) -> dict:
    document = {"format": "tmpdiff.schedule/2", "steps": len(precisions), "precisions": precisions,
                "timesteps": timesteps, **extra}
    path.write_text(json.dumps(document))
    return document


class Recording:
    """A real engine that also records, at each run, the timestep values in the buffer it is bound to."""

    def __init__(self, engine, seen: list[tuple[str, list[float]]]) -> None:
        self.engine, self.seen = engine, seen
        self.precision, self.device = engine.precision, engine.device
        self._timestep: torch.Tensor | None = None

    input_specs = property(lambda self: self.engine.input_specs)
    output_specs = property(lambda self: self.engine.output_specs)

    def bind(self, inputs, outputs) -> None:
        self._timestep = inputs["timestep"]
        self.engine.bind(inputs, outputs)

    def run(self, stream) -> None:
        self.seen.append((self.precision, self._timestep.tolist()))
        self.engine.run(stream)

    def unbind(self) -> None:
        self.engine.unbind()

    def close(self) -> None:
        self.engine.close()


# --- the format ------------------------------------------------------------------------------------------------

def test_v1_file_as_written_today_reads_unchanged_and_is_written_as_v1(tmp_path):
    # exactly what `save_schedule` wrote before /2 (a calibrated schedule with figures and costs)
    v1 = {"format": "tmpdiff.schedule/1", "steps": 3, "scheduler": None, "precisions": ["fp32", "int8", "fp32"],
          "reference": "fp32", "target": {"speedup": 1.1, "metric": "latent"}, "predicted": {"speedup": 1.12, "error": 1e-4},
          "measured": {"speedup": 1.05, "ssim": 0.99}, "evaluations": 7, "costs": {"backend": "ort"}}
    (tmp_path / "v1.json").write_text(json.dumps(v1, indent=2))
    schedule = load_schedule(tmp_path / "v1.json")
    assert schedule.timesteps is None and schedule.precisions == ["fp32", "int8", "fp32"]
    save_schedule(schedule, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == v1  # still /1, no timesteps field


def test_v2_round_trip(tmp_path):
    schedule = Schedule(steps=len(PRECISIONS), precisions=PRECISIONS, timesteps=TIMESTEPS)
    assert schedule.format == "tmpdiff.schedule/2"
    save_schedule(schedule, tmp_path / "s.json")
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["format"] == "tmpdiff.schedule/2" and written["timesteps"] == TIMESTEPS
    assert load_schedule(tmp_path / "s.json") == schedule
    # a /2 file without timesteps reads, and is written back as /1
    _v2(tmp_path / "plain.json", timesteps=None)
    save_schedule(load_schedule(tmp_path / "plain.json"), tmp_path / "plain-again.json")
    assert json.loads((tmp_path / "plain-again.json").read_text())["format"] == "tmpdiff.schedule/1"


@pytest.mark.parametrize(("timesteps", "extra", "message"), [
    ([999, 500, 700], {}, r"strictly decreasing .*step 2 has 700 after 500"),
    ([999, 500, 500], {}, "timestep 500 appears 2 times"),
    ([999, 500, -1], {}, r"timestep -1 is outside the training timesteps \(0 or more\)"),
    ([1000, 500, 0], {"scheduler": {"class_name": "DDPMScheduler", "config": {"num_train_timesteps": 1000}}},
     r"timestep 1000 is outside the training timesteps \(0\.\.999\)"),
    ([999, 500], {}, "2 timesteps for 3 steps"),
    ([999, 500.5, 0], {}, r"timesteps\.1: Input should be a valid integer"),
    ([999, 500.0, 0], {}, r"timesteps\.1: Input should be a valid integer"),
    ([999, "500", 0], {}, r"timesteps\.1: Input should be a valid integer"),
    ([999, True, 0], {}, r"timesteps\.1: Input should be a valid integer"),
    ([999, 500, 0], {"format": "tmpdiff.schedule/1"}, "timesteps need format tmpdiff.schedule/2"),
])
def test_bad_timesteps_are_refused_naming_the_file(tmp_path, timesteps, extra, message):
    path = tmp_path / "bad-timesteps.json"
    _v2(path, timesteps=timesteps, precisions=["fp32"] * 3, **extra)
    with pytest.raises(TmpdiffError, match=message) as caught:
        load_schedule(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


# --- which schedulers can --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler",
                                  "DDPMScheduler", "LCMScheduler", "TCDScheduler"])
def test_schedulers_that_sample_at_custom_timesteps(name):
    import diffusers

    from tmpdiff.models.schedulers import set_custom_timesteps

    scheduler = getattr(diffusers, name)()
    set_custom_timesteps(scheduler, TIMESTEPS, "s.json")
    assert [float(t) for t in scheduler.timesteps] == [float(t) for t in TIMESTEPS]


@pytest.mark.parametrize(("name", "config", "why"), [
    ("DDIMScheduler", {}, "takes no timesteps="),
    ("UniPCMultistepScheduler", {}, "takes no timesteps="),
    ("PNDMScheduler", {}, "takes no timesteps="),
    ("EulerAncestralDiscreteScheduler", {}, "takes no timesteps="),
    ("HeunDiscreteScheduler", {}, r"does not sample at exactly the schedule's timesteps \(it would run 13 steps"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
])
def test_schedulers_that_cannot_are_refused_in_one_line(name, config, why):
    import diffusers

    from tmpdiff.models.schedulers import set_custom_timesteps

    with pytest.raises(TmpdiffError, match=f"^s.json: .*{name}.*{why}") as caught:
        set_custom_timesteps(getattr(diffusers, name).from_config(config), TIMESTEPS, "s.json")
    assert "\n" not in str(caught.value)


# --- `tmpdiff run` ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def build(bundled, tmp_path_factory):
    """The bundled model exported at fp32 and fp16 with its sampling info, built as ORT-CPU engines (~10 s)."""
    from tmpdiff.engines.build import build_engines
    from tmpdiff.export.exporter import export_model
    from tmpdiff.models.bundled import sampling_info

    build_dir, _ = export_model(bundled.transformer_dir, tmp_path_factory.mktemp("ts"), ["fp32", "fp16"], model_id="tiny-dit",
                                sampling=sampling_info(bundled))
    build_engines(build_dir, "ort", "cpu")
    return build_dir


@pytest.fixture
def recorded(monkeypatch):
    """Every engine `tmpdiff run` loads, wrapped to record (precision, timestep buffer) at each run."""
    import tmpdiff.commands.run as run_command

    seen: list[tuple[str, list[float]]] = []
    load = run_command.load_plan_engines
    monkeypatch.setattr(run_command, "load_plan_engines",
                        lambda *a, **k: {p: Recording(e, seen) for p, e in load(*a, **k).items()})
    return seen


def test_run_samples_at_exactly_the_schedules_timesteps(build, tmp_path, recorded):
    from tmpdiff.commands.run import RunRequest, run

    _v2(tmp_path / "s.json")
    result, plan, _ = run(RunRequest(build_dir=build, classes=[3, 8], schedule_path=tmp_path / "s.json"))
    rows = 4  # two classes, conditional and unconditional halves
    assert recorded == [(p, [float(t)] * rows) for p, t in zip(PRECISIONS, TIMESTEPS, strict=True)]
    assert [(e.timestep, e.precision) for e in result.trace.steps] == list(zip(TIMESTEPS, PRECISIONS, strict=True))
    assert plan.steps == len(TIMESTEPS)  # the step count comes from the schedule, not the model's default (20)
    assert torch.isfinite(result.latents).all()
    # the same precisions at the scheduler's own 7-step spacing give other latents: the timesteps were used
    recorded.clear()
    save_schedule(Schedule(steps=len(PRECISIONS), precisions=PRECISIONS), tmp_path / "own.json")
    own, _, _ = run(RunRequest(build_dir=build, classes=[3, 8], schedule_path=tmp_path / "own.json"))
    assert [t for _, [t, *_] in recorded] != [float(t) for t in TIMESTEPS]
    assert not torch.allclose(own.latents, result.latents, atol=1e-3)


@pytest.mark.parametrize(("timesteps", "extra", "request_kwargs", "message"), [
    (TIMESTEPS, {}, {"steps": 20}, "schedule has 7 steps but --steps 20"),
    ([1000, *TIMESTEPS[1:]], {}, {}, r"timestep 1000 is outside DPMSolverMultistepScheduler's training timesteps 0\.\.999"),
    (TIMESTEPS, {"ddim": True}, {}, "DDIMScheduler cannot sample at custom timesteps"),
])
def test_runs_that_cannot_sample_there_are_refused_before_the_first_step(build, tmp_path, recorded, timesteps, extra,
                                                                         request_kwargs, message):
    from tmpdiff.commands.run import RunRequest, run
    from tmpdiff.formats.manifest import load_manifest

    if extra.pop("ddim", False):
        sampling = load_manifest(build).sampling
        extra["scheduler"] = SchedulerRef(class_name="DDIMScheduler", config=sampling.scheduler_config).model_dump(mode="json")
    path = tmp_path / "refused.json"
    _v2(path, timesteps=timesteps, **extra)
    with pytest.raises(TmpdiffError, match=message) as caught:
        run(RunRequest(build_dir=build, classes=[0], schedule_path=path, **request_kwargs))
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
    assert recorded == []


def test_runner_refuses_timesteps_that_do_not_fit_the_precisions(build, bundled):
    from tmpdiff.engines.loading import load_built_engines
    from tmpdiff.formats.manifest import load_manifest
    from tmpdiff.models.schedulers import sampling_scheduler
    from tmpdiff.runtime.runner import ScheduledRunner, initial_noise

    sampling = load_manifest(build).sampling
    engines = load_built_engines(build, load_manifest(build), "ort", "cpu", ["fp32"], None)
    runner = ScheduledRunner(engines, batch=1, channels=sampling.channels, size=sampling.image_size, guidance_scale=1.0,
                             null_class=sampling.null_class, num_classes=sampling.num_classes)
    with pytest.raises(TmpdiffError, match="3 timesteps for 2 steps"):
        runner.sample(sampling_scheduler(sampling), torch.tensor([1]), initial_noise(1, sampling.channels, sampling.image_size, 0),
                      ["fp32", "fp32"], timesteps=[900, 500, 100])
    runner.close()


def test_cli_run_reports_the_schedules_timesteps(build, tmp_path):
    _v2(tmp_path / "s.json")
    done = cli_run("run", build, "--schedule", tmp_path / "s.json", "--class", "3", "--out", tmp_path / "img.png", "--json")
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout)["steps"]
    assert [(s["timestep"], s["precision"]) for s in steps] == list(zip(TIMESTEPS, PRECISIONS, strict=True))


# --- the diffusers drop-in -------------------------------------------------------------------------------------

PIPE_TIMESTEPS = [980, 700, 330, 40]


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """A tiny PixArt-Sigma pipeline (DPM-Solver++) saved to a directory, and its denoiser's fp32 ORT build."""
    from tmpdiff.engines.build import build_engines
    from tmpdiff.export.exporter import export_model

    root = tmp_path_factory.mktemp("pixart")
    pipe = tiny_pipelines.build("pixart")
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    model_dir = tiny_pipelines.save_denoiser(pipe, root / "transformer")
    build_dir, _ = export_model(model_dir, root / "build", ["fp32"], model_id="pixart",
                                graph_sizes=tiny_pipelines.PIPELINES["pixart"][1])
    build_engines(build_dir, "ort", "cpu")
    save_schedule(Schedule(steps=4, precisions=["fp32"] * 4, timesteps=PIPE_TIMESTEPS), root / "s.json")
    return root, build_dir


def _latents(pipe, **kwargs) -> np.ndarray:
    out = pipe(["a photo of a cat"], height=tiny_pipelines.SIZE, width=tiny_pipelines.SIZE, generator=torch.Generator().manual_seed(7),
               output_type="latent", **tiny_pipelines.PIPELINES["pixart"][2], **kwargs)
    return out.images.numpy()


def test_dropin_passes_the_timesteps_through(pixart):
    from tmpdiff.runtime.dropin import attach_engines

    root, build_dir = pixart
    want = _latents(tiny_pipelines.build("pixart"), timesteps=PIPE_TIMESTEPS)  # the torch pipeline at those timesteps
    pipe = tiny_pipelines.build("pixart")
    denoiser = attach_engines(pipe, build_dir, schedule=root / "s.json")
    seen: list[tuple[str, list[float]]] = []
    denoiser.engines = {p: Recording(e, seen) for p, e in denoiser.engines.items()}
    assert denoiser.timesteps == PIPE_TIMESTEPS and denoiser.steps == 4
    got = _latents(pipe, num_inference_steps=denoiser.steps, timesteps=denoiser.timesteps)
    assert [values[0] for _, values in seen] == [float(t) for t in PIPE_TIMESTEPS]
    assert [e.timestep for e in denoiser.trace.steps] == PIPE_TIMESTEPS
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    # called without them, the pipeline would sample elsewhere: refused before any engine runs
    seen.clear()
    with pytest.raises(TmpdiffError, match=r"s\.json: the schedule samples at its own 4 timesteps .*timesteps=denoiser\.timesteps"):
        _latents(pipe, num_inference_steps=4)
    assert seen == []


def test_dropin_refuses_a_pipeline_that_cannot_take_them(pixart):
    from diffusers import DDIMScheduler

    from tmpdiff.runtime.dropin import attach_engines, check_takes_timesteps
    from tmpdiff.runtime.plan import resolve_plan

    root, build_dir = pixart
    pipe = tiny_pipelines.build("pixart")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(TmpdiffError, match=r"s\.json: DDIMScheduler cannot sample at custom timesteps"):
        attach_engines(pipe, build_dir, schedule=root / "s.json")
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"  # left as it was
    # Flux (like SD3) takes sigmas=, not timesteps=
    with pytest.raises(TmpdiffError, match="FluxPipeline takes no timesteps="):
        check_takes_timesteps(tiny_pipelines.build("flux"), resolve_plan(root / "s.json"))


def test_run_pipeline_passes_the_timesteps(pixart):
    from tmpdiff.commands.run_prompts import PromptRequest, run_prompts

    root, build_dir = pixart
    images, denoiser, _ = run_prompts(PromptRequest(build_dir=build_dir, pipeline_dir=root / "pipe", prompts=["a red house"],
                                                    schedule_path=root / "s.json"))
    assert images.shape[0] == 1
    assert [e.timestep for e in denoiser.trace.steps] == PIPE_TIMESTEPS


def test_a_plans_solver_replaces_a_pipelines_own_of_the_same_class_configured_otherwise():
    """Rows learned on DDIM 'trailing' run on a DDIM 'linspace' pipeline with the plan's spacing (the pipeline's own
    scheduler was kept because the class matched, and the run refused the rows' timesteps); the same configuration
    keeps the pipeline's."""
    from diffusers import DDIMScheduler

    from tmpdiff.models.schedulers import plan_scheduler_for

    own = DDIMScheduler(timestep_spacing="linspace")
    trailing = {k: v for k, v in own.config.items() if not k.startswith("_")} | {"timestep_spacing": "trailing"}
    plan = Schedule(steps=3, precisions=["fp32"] * 3, scheduler=SchedulerRef(class_name="DDIMScheduler", config=trailing))
    chosen = plan_scheduler_for(plan, own)
    assert chosen is not None and chosen.config.timestep_spacing == "trailing"
    same = plan.model_copy(update={"scheduler": SchedulerRef(class_name="DDIMScheduler", config=trailing)})
    assert plan_scheduler_for(same, DDIMScheduler.from_config(trailing)) is None
