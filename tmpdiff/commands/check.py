"""`tmpdiff check`: a build directory is valid or clearly invalid, one line per problem with its fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmpdiff.formats.errors import TmpdiffError


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} -> {self.fix}"


def check_build(build_dir: Path, schedules: list[Path] | None = None, spot_check: bool = True,
                notes: list[str] | None = None) -> list[Problem]:
    """Every check that can fail, collected (not stopping at the first); what could not be checked is added to
    `notes`."""
    from tmpdiff.engines.ort_build import engine_state
    from tmpdiff.export.onnx_io import load_onnx
    from tmpdiff.formats.atomic import interrupted_writes
    from tmpdiff.formats.manifest import load_manifest, precision_problems

    # a killed export/build leaves its in-flight temp; the next run of it (under the build lock) removes it
    problems = [Problem(str(path), "incomplete write left by an interrupted tmpdiff process",
                        "re-run the interrupted `tmpdiff export` or `tmpdiff build` (it removes this)")
                for path in interrupted_writes(build_dir)]
    try:
        manifest = load_manifest(build_dir)
    except TmpdiffError as exc:
        fix = "re-run `tmpdiff export ... --force` (it starts the build over)" if (build_dir / "manifest.json").is_file() \
            else "re-run `tmpdiff export`"
        return [*problems, Problem(str(exc.path or build_dir), str(exc).split(": ", 1)[-1], fix)]
    root = build_dir.resolve()
    problems += _unrecorded_precisions(build_dir, manifest)
    if manifest.sampling is not None:  # what `run` and `calibrate` sample with
        from tmpdiff.models.schedulers import sampling_scheduler

        try:
            manifest.require_sampling(build_dir)
            sampling_scheduler(manifest.sampling, build_dir / "manifest.json")
        except TmpdiffError as exc:
            problems.append(Problem(str(build_dir / "manifest.json"), f"sampling: {str(exc).split(': ', 1)[-1]}",
                                    "re-export from a model directory whose scheduler config diffusers accepts"))
        mismatch = _sampling_mismatch(manifest.sampling, {spec.name: spec.shape for spec in manifest.inputs},
                                      "the manifest's inputs take")
        if mismatch is not None:
            problems.append(Problem(str(build_dir / "manifest.json"), mismatch, "re-export without --sample-size (a "
                                    "class-conditional model's graphs take the size it samples at)"))
    for name, entry in manifest.precisions.items():
        broken = precision_problems(build_dir, entry)
        for path, problem in broken:
            problems.append(Problem(str(path), f"{name}: {problem}", f"re-run `tmpdiff export --precisions {name}`"))
        for rel, _ in [] if broken else entry.graphs():
            try:
                graph = load_onnx(root / rel, root)
            except TmpdiffError as exc:
                problems.append(Problem(str(root / rel), str(exc).split(": ", 1)[-1], "re-run `tmpdiff export`"))
                continue
            mismatch = _io_mismatch(graph, manifest)
            if mismatch is not None:
                problems.append(Problem(str(root / rel), f"{name}: {mismatch}", "re-run `tmpdiff export` (the manifest's "
                                        "inputs/outputs are what engines are bound and TensorRT profiles built by)"))
            mismatch = _sampling_mismatch(manifest.sampling, _graph_inputs(graph), "the graph takes")
            if mismatch is not None:
                problems.append(Problem(str(root / rel), f"{name}: {mismatch}", "re-export without --sample-size"))
    for name in manifest.mixed:
        from tmpdiff.formats.manifest import STALE_EXPORT, mixed_problem

        problem = mixed_problem(build_dir, manifest, name) or _mixed_layers_problem(build_dir, manifest, name)
        if problem is not None:
            # a plan searched on the older export is refused by deploy-plan too: its layers were chosen with those scales
            fix = ("search again (`tmpdiff search-plan`) and deploy the new plan" if problem.startswith(STALE_EXPORT)
                   else "re-run `tmpdiff deploy-plan` with the plan that names it")
            problems.append(Problem(str(build_dir / manifest.mixed[name].onnx), f"layer configuration {name}: {problem}",
                                    fix))
    if manifest.time_embedding_input is not None:
        from tmpdiff.models.time_embedding_input import load_own_table

        try:
            load_own_table(build_dir, manifest)
        except TmpdiffError as exc:
            problems.append(Problem(str(exc.path or build_dir), str(exc).split(": ", 1)[-1],
                                    "re-run `tmpdiff export ... --time-embedding-input`"))
    for key, engine in manifest.engines.items():
        problem = engine_state(build_dir, manifest, engine)
        if problem is not None:
            problems.append(Problem(str(build_dir / engine.path), f"engine {key}: {problem}",
                                    f"run `tmpdiff build {build_dir} --backend {engine.backend}` on the target machine"))
    for schedule_path in schedules or []:
        from tmpdiff.formats.schedule import load_schedule
        from tmpdiff.runtime.plan import is_tmpq_plan, resolve_plan

        if is_tmpq_plan(schedule_path):  # a TMPQ-DM plan: its layer configurations must be deployed here
            try:
                plan = resolve_plan(schedule_path)
                plan.check_model(manifest)
                _check_schedule_scheduler(plan.file, manifest, schedule_path, notes)
            except TmpdiffError as exc:
                problems.append(Problem(str(schedule_path), str(exc).split(": ", 1)[-1], "re-run `tmpdiff search-plan`"))
                continue
            from tmpdiff.formats.manifest import mixed_problem

            for name in plan.needed:
                problem = (mixed_problem(build_dir, manifest, name) if name.startswith("mixed-")
                           else None if name in manifest.precisions else "not exported here")
                if problem is not None:
                    problems.append(Problem(str(schedule_path), f"layer configuration {name}: {problem}",
                                            f"run `tmpdiff deploy-plan {build_dir} {schedule_path}`"))
            continue

        try:
            schedule = load_schedule(schedule_path)
        except TmpdiffError as exc:
            problems.append(Problem(str(schedule_path), str(exc).split(": ", 1)[-1], "re-run `tmpdiff calibrate`"))
            continue
        missing = sorted(set(schedule.precisions) - set(manifest.precisions))
        if missing:
            problems.append(Problem(str(schedule_path), f"uses {', '.join(missing)}, not exported here",
                                    f"export them or re-run `tmpdiff calibrate {build_dir}`"))
        try:
            _check_schedule_scheduler(schedule, manifest, schedule_path, notes)
        except TmpdiffError as exc:
            problems.append(Problem(str(schedule_path), str(exc).split(": ", 1)[-1], f"re-run `tmpdiff calibrate {build_dir}`"))
        try:  # the time-embeddings file a /3 schedule names: readable, its steps, and its slots for these graphs
            from tmpdiff.runtime.time_conditioning import check_build as check_conditioning
            from tmpdiff.runtime.time_conditioning import load_conditioning

            check_conditioning(load_conditioning(schedule, schedule_path), manifest, build_dir)
        except TmpdiffError as exc:
            problems.append(Problem(str(exc.path or schedule_path), str(exc).split(": ", 1)[-1],
                                    "re-run `tmpdiff plan-embeddings` (or distill-embeddings) for this build"))
    if spot_check and not problems:
        problems += _spot_check(build_dir, manifest)
    return problems


def _mixed_layers_problem(build_dir: Path, manifest, name: str) -> str | None:
    """A deployed layer configuration's quantized layers against the uniform twins (`export.twin_match`; deployments
    made before that check existed were never compared)."""
    import onnx

    from tmpdiff.export.twin_match import check_layers_match_uniform, uniform_twins_of
    from tmpdiff.formats.manifest import precision_problems

    entry = manifest.mixed[name]
    quantized = sorted(set(entry.precisions) - {"fp32"})
    if any(p not in manifest.precisions or precision_problems(build_dir, manifest.precisions[p]) for p in quantized):
        return None  # a missing or broken source precision is its own problem, reported with its fix (re-export)
    half = any(manifest.precisions[p].reference_dtype != "float32" for p in quantized)
    try:
        check_layers_match_uniform(onnx.load(str(build_dir / entry.onnx)), uniform_twins_of(build_dir, manifest, quantized),
                                   {p: entry.precisions.count(p) for p in quantized}, build_dir / entry.onnx,
                                   tolerant=half)
    except TmpdiffError as exc:
        return str(exc).removeprefix(f"{exc.path}: ")
    return None


def _check_schedule_scheduler(schedule, manifest, path: Path, notes: list[str] | None) -> None:
    """What `run` checks of a schedule's scheduler before it loads engines: the scheduler it names (or the build's
    sampling scheduler) has the model's noise process, samples at its timesteps, and gives its steps distinct
    timesteps. A build without sampling info runs inside a pipeline: a schedule naming no scheduler samples with the
    pipeline's (not known here), and one naming a scheduler is held to the pipeline scheduler an export calibrated
    in, when the manifest records one."""
    from tmpdiff.models.schedulers import check_distinct_timesteps, check_noise_process, schedule_scheduler

    if schedule.scheduler is None and manifest.sampling is None:
        if notes is not None:
            notes.append(f"{path}: names no scheduler and the build has no sampling info: the pipeline's scheduler "
                         "decides its timesteps (`run --pipeline` checks its steps with it)")
        return
    scheduler = schedule_scheduler(schedule, manifest.sampling, path)
    recorded = _calibration_pipeline_scheduler(manifest) if manifest.sampling is None else None
    if recorded is not None:
        name, reference = recorded
        check_noise_process(scheduler, reference.config, "the schedule's scheduler",
                            f"the pipeline's ({name} was calibrated in it)", path)
    elif manifest.sampling is None and notes is not None:
        notes.append(f"{path}: its scheduler's noise process is not compared with the pipeline's: no precision of "
                     "this build was calibrated in a pipeline (`run --pipeline` compares them)")
    if schedule.timesteps is None:
        try:
            check_distinct_timesteps(scheduler, schedule.steps)
        except TmpdiffError as exc:
            raise TmpdiffError(str(exc), path) from None


def _calibration_pipeline_scheduler(manifest):
    """(precision, scheduler) of the pipeline a quantized precision was calibrated in (its recipe records the
    pipeline's scheduler config), or None when no precision records one."""
    from tmpdiff.formats.config_values import decode_non_finite
    from tmpdiff.models.schedulers import scheduler_from

    for name, entry in manifest.precisions.items():
        config = ((entry.quantization or {}).get("calibration") or {}).get("scheduler")
        if isinstance(config, dict) and config.get("_class_name"):
            return name, scheduler_from(config["_class_name"], decode_non_finite(config))
    return None


@dataclass(frozen=True)
class Replay:
    """One engine run on its precision's recorded check input."""

    precision: str
    output: np.ndarray | None  # None when the engine failed to run
    error: float  # relative L2 vs the exported graph's recorded output (inf when it failed)
    failure: str | None = None


def _io_mismatch(graph, manifest) -> str | None:
    """How a graph's inputs and outputs (names and ranks) differ from those the manifest records, or None."""
    for kind, recorded, actual in (("inputs", manifest.inputs, graph.graph.input),
                                   ("outputs", manifest.outputs, graph.graph.output)):
        want = [(spec.name, len(spec.shape)) for spec in recorded]
        got = [(value.name, len(value.type.tensor_type.shape.dim)) for value in actual]
        if sorted(want) != sorted(got):
            return f"its {kind} {got} are not the manifest's {want}"
    return None


def _sampling_mismatch(sampling, inputs: dict[str, list], what: str) -> str | None:
    """How the latent input (`inputs`: name -> shape) differs from the latents `run` samples (the sampling info's
    channels x image_size x image_size), or None."""
    shape = inputs.get("hidden_states")
    if sampling is None or shape is None or len(shape) != 4:
        return None
    want = [sampling.channels, sampling.image_size, sampling.image_size]
    if list(shape[1:]) != want:
        return (f"{what} hidden_states of {tuple(shape)}, but the manifest's sampling makes latents of "
                f"{tuple(['batch', *want])} (image_size {sampling.image_size}): `run` would fail")
    return None


def _graph_inputs(graph) -> dict[str, list]:
    """A graph's input shapes: fixed sizes as ints, named ones as their names."""
    return {value.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                         for d in value.type.tensor_type.shape.dim] for value in graph.graph.input}


def replay_check_inputs(build_dir: Path, manifest, backend: str, device: str) -> dict[str, Replay]:
    """Load the engines `run` would load for this backend and device and run each on the input recorded at export."""
    import torch
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from tmpdiff.engines.loading import load_engines
    from tmpdiff.engines.streams import on_stream, runtime_stream
    from tmpdiff.formats.manifest import CHECK_IO_NAME
    from tmpdiff.runtime.engine_use import close_engines

    names = manifest.built_precisions(backend, device)
    engines = load_engines(build_dir, manifest, backend, device, names)
    on = "cpu" if device == "cpu" else "cuda"
    replays = {}
    try:
        for name, engine in engines.items():
            io_path = build_dir / name / CHECK_IO_NAME
            if f"{name}/{CHECK_IO_NAME}" not in manifest.precisions[name].artifacts:
                replays[name] = Replay(name, None, float("inf"), "no recorded check input (exported by an older tmpdiff)")
                continue
            try:
                recorded = load_file(str(io_path))
            except (OSError, SafetensorError) as exc:  # a file whose recorded hash was rewritten with it
                replays[name] = Replay(name, None, float("inf"), f"its recorded check input {io_path} cannot be read ({exc})")
                continue
            if not any(k.startswith("output.") for k in recorded):
                replays[name] = Replay(name, None, float("inf"), f"its recorded check input {io_path} holds no output")
                continue
            want = {k.removeprefix("output."): v for k, v in recorded.items() if k.startswith("output.")}
            stream = runtime_stream(device)
            try:
                with on_stream(stream):  # the copies and zero-fill are ordered before the engine's launch on its stream
                    inputs = {k.removeprefix("input."): torch.from_numpy(v).to(on) for k, v in recorded.items()
                              if k.startswith("input.")}
                    got = {k: torch.zeros(v.shape, dtype=torch.from_numpy(v).dtype, device=on) for k, v in want.items()}
                    engine.bind(inputs, got)
                    engine.run(stream)
                stream.synchronize()
            except Exception as exc:  # the backends' own error types for a graph that loads but cannot run
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                replays[name] = Replay(name, None, float("inf"), f"fails on the recorded check input ({first})")
                continue
            out_name = next(iter(want))
            output = got[out_name].cpu().numpy()
            replays[name] = Replay(name, output, _relative(output, want[out_name]))
    finally:
        close_engines(engines.values())  # a TensorRT plan's context, engine and activation memory
    return replays


def _spot_check(build_dir: Path, manifest) -> list[Problem]:
    """Replay each precision's recorded input on the engines `run` loads (ORT on each device it was built for that
    this machine has), and compare with the output the exported graph gave at export: within the precision's parity
    tolerance, and its error vs the fp32 engine within 3x what the manifest recorded. TensorRT plans are replayed
    by `tmpdiff doctor --gpu` on a GPU."""
    import torch

    from tmpdiff.formats.precisions import get_precision

    problems = []
    devices = sorted({e.build_flags.get("device", "cpu") for e in manifest.engines.values() if e.backend == "ort"})
    for device in devices:
        if device != "cpu" and not torch.cuda.is_available():
            continue  # built for a GPU provider on another machine: `tmpdiff check` there runs them
        rebuild = f"run `tmpdiff build {build_dir} --device {device}`"
        try:
            replays = replay_check_inputs(build_dir, manifest, "ort", device)
        except TmpdiffError as exc:
            problems.append(Problem(str(exc.path or build_dir), str(exc).split(": ", 1)[-1], rebuild))
            continue
        for name, replay in replays.items():
            tolerance = get_precision(name).parity_tolerance
            if replay.failure is not None:
                problems.append(Problem(str(build_dir / name), f"the {name} engine: {replay.failure}", rebuild))
            elif not replay.error <= tolerance:
                problems.append(Problem(str(build_dir / name), f"the {name} engine's output on the recorded check input "
                                        f"differs from the exported graph's by {replay.error:.2e} (tolerance {tolerance:.0e})",
                                        f"{rebuild} (or re-export {name})"))
        for name, replay in replays.items():
            # each precision's recorded error is against the torch model it was made from: fp32, or a 16-bit load
            # (whose own graph is the fp16 precision exported from that load)
            entry = manifest.precisions[name]
            ref_name = {"float32": "fp32", "float16": "fp16"}[entry.reference_dtype]
            reference = replays.get(ref_name)
            if (reference is None or reference.output is None or replay.output is None or name == ref_name
                    or manifest.precisions[ref_name].reference_dtype != entry.reference_dtype):
                continue
            error, recorded = _relative(replay.output, reference.output), entry.error_vs_fp32
            if not error <= 3 * recorded + 1e-4:
                problems.append(Problem(str(build_dir / name), f"the {name} engine differs from {ref_name} by "
                                        f"{error:.2e}; the manifest recorded {recorded:.2e}",
                                        f"re-run `tmpdiff export --precisions {name}`"))
    return problems


def _relative(got, want) -> float:
    error = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
    return error if np.isfinite(error) else float("inf")


def calibration_notes(build_dir: Path) -> list[str]:
    """One line per quantized precision saying what its activation ranges were calibrated on (random inputs said
    plainly: quantization calibrated on them can lose far more than on the model's real inputs)."""
    from tmpdiff.formats.manifest import load_manifest

    try:
        manifest = load_manifest(build_dir)
    except TmpdiffError:
        return []
    notes = []
    for name, entry in manifest.precisions.items():
        calibration = (entry.quantization or {}).get("calibration")
        if not calibration:
            continue
        source = calibration.get("source", "unknown")
        if source == "random inputs":
            notes.append(f"{name}: calibrated on random N(0, 1) inputs (--random-calibration), not on the model's "
                         f"real inputs; {calibration.get('batches')} batches")
        elif "prompts" in calibration:
            notes.append(f"{name}: calibrated on {calibration['prompts']} prompts x {len(calibration.get('seeds', []))} "
                         f"seeds x {calibration.get('steps')} steps of {calibration.get('pipeline')} (guidance "
                         f"{calibration.get('guidance_scale')}), {calibration.get('batches')} batches")
        else:
            notes.append(f"{name}: calibrated on {source}, {calibration.get('batches')} batches")
        host = calibration.get("captured_on")
        if host:  # the scales follow from these tensors, whose last bits depend on the kernels that computed them
            kernels = f" ({host['kernels']} kernels)" if host.get("kernels") else ""
            notes[-1] += f"; captured with torch {host.get('torch')} on {host.get('device')}{kernels}"
    return notes


def _unrecorded_precisions(build_dir: Path, manifest) -> list[Problem]:
    """A precision's folder the manifest does not record: an export stopped between writing its files and recording
    them, or an earlier build's (another model's, replaced with --force). `run` never reads it."""
    from tmpdiff.formats.precisions import PRECISIONS

    found = []
    for name in sorted(set(PRECISIONS) - set(manifest.precisions)):
        folder = build_dir / name
        if folder.is_dir() and not folder.is_symlink() and any(folder.iterdir()):
            found.append(Problem(str(folder), f"{name} files the manifest does not record (an export that did not "
                                 "finish, or an earlier build's)", f"re-run `tmpdiff export --precisions {name}`, or "
                                 "delete the folder"))
    return found
