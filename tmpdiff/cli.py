"""The `tmpdiff` command line."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tmpdiff.formats.errors import TmpdiffError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Temporal mixed precision for diffusion denoisers.")
console = Console(stderr=True)
_state = {"debug": False}

class BackendName(StrEnum):
    ort = "ort"
    trt = "trt"


class TrtDtype(StrEnum):
    float16 = "float16"
    bfloat16 = "bfloat16"


class LoadDtype(StrEnum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"


class DeviceName(StrEnum):
    cpu = "cpu"
    cuda = "cuda"
    trt_ep = "trt-ep"


class SamplingMode(StrEnum):
    """DRiffusion modes (tmpdiff/runtime/parallel.py): rate 2/(n+1) and 1/n in rounds of denoiser calls."""

    conservative = "conservative"
    aggressive = "aggressive"


class ExecutorName(StrEnum):
    local = "local"
    ray = "ray"


BackendOpt = Annotated[BackendName, typer.Option(help="ort (ONNX Runtime) or trt (native TensorRT)")]
DeviceOpt = Annotated[DeviceName | None, typer.Option(help="ORT: cpu | cuda | trt-ep (default cpu); trt: always cuda")]


def _device(backend: BackendName, device: DeviceName | None) -> str:
    from tmpdiff.engines.loading import resolve_device

    return resolve_device(backend.value, None if device is None else device.value)


Wait = Annotated[float, typer.Option("--wait", min=0, help="seconds to wait for another export/build of the same "
                                                            "build directory to finish")]
Force = Annotated[bool, typer.Option("--force", help="replace existing outputs (and write through symbolic links)")]
JsonOutput = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="schedule evaluations on this many Ray actors (each with "
                                                            "its own engines; --threads each, default cores // N); "
                                                            "results as in one process")]
ClusterOpt = Annotated[str | None, typer.Option("--address", help="with --workers: an existing Ray cluster (default: "
                                                                  "start a local Ray)")]
CostsOpt = Annotated[Path, typer.Option(help="costs table (tmpdiff.costs/1): measured by `tmpdiff profile` or stated "
                                               "for a device by `tmpdiff costs`")]


def _print_version(value: bool) -> None:
    if value:
        import importlib.metadata

        typer.echo(f"tmpdiff {importlib.metadata.version('tmpdiff')}")
        raise typer.Exit()


@app.callback()
def _global(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for expected errors")] = False,
            version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                  help="print the version and exit")] = False):
    _state["debug"] = debug


def _finite(option: str) -> Callable[[float | None], float | None]:
    """A callback refusing a non-finite number (nan, inf) for `option` before anything loads."""
    def check(value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise TmpdiffError(f"{option} must be a finite number, got {value}")
        return value
    return check


def _pipeline_path(value: Path | None) -> Path | None:
    """`--pipeline bundled-t2i`: the bundled text-to-image pipeline's directory (a folder of that name here wins)."""
    if value is not None and str(value) == "bundled-t2i" and not value.exists():
        from tmpdiff.models.tiny_t2i import t2i_dir

        return t2i_dir()
    return value


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="diffusers model directory, pipeline directory (with --subfolder), 'bundled' "
                                               "or 'bundled-t2i' (the bundled text-to-image pipeline's transformer)")],
    out: Annotated[Path, typer.Option(help="build root; artifacts go to OUT/<model-id>/")] = Path("build"),
    precisions: Annotated[str, typer.Option(help="comma-separated: fp32,fp16,int8,int8-sq,fp8,int4,nvfp4")] = "fp32,fp16,int8,fp8,int4",
    subfolder: Annotated[str | None, typer.Option(help="model subfolder of a pipeline directory (transformer, unet)")] = None,
    model_id: Annotated[str | None, typer.Option(help="name of the build directory (default: the model dir's name)")] = None,
    calib_seeds: Annotated[str, typer.Option(help="noise seeds of the calibration trajectories")] = "0,1",
    calib_classes: Annotated[str | None, typer.Option(help="classes of the calibration trajectories (default: all); for "
                                                         "a pipeline that takes class labels (DiTPipeline): the labels "
                                                         "its capture runs sample")] = None,
    prompts: Annotated[Path | None, typer.Option(help="pipeline denoisers: prompts file (one per line); the stock pipeline "
                                                      "runs over them and the denoiser's inputs calibrate quantization")] = None,
    calib_steps: Annotated[int | None, typer.Option(min=1, help="denoising steps of the calibration runs: a class-"
                                                                "conditional model's sampled trajectories (default: its "
                                                                "sampling steps) or a pipeline's --prompts / "
                                                                "--calib-classes runs (default 20); up to the scheduler's "
                                                                "training timesteps; not with --random-calibration")]
    = None,
    calib_guidance: Annotated[float | None, typer.Option(
        callback=_finite("--calib-guidance"), help="classifier-free guidance scale of the calibration runs "
                                                              "(a finite number; default: the class-conditional model's "
                                                              "or the pipeline's); not with --random-calibration")]
    = None,
    random_calibration: Annotated[bool, typer.Option("--random-calibration", help="calibrate quantization on random "
                                                     "N(0, 1) inputs (recorded in the manifest)")] = False,
    random_batches: Annotated[int | None, typer.Option(min=1, help="--random-calibration: batches of 2 random inputs "
                                                                   "(default 8; AWQ's search runs 12 forwards per batch)")]
    = None,
    keep_high_precision: Annotated[str | None, typer.Option(
        help="comma-separated modelopt wildcards of layers left unquantized (default: embeddings, in/out projections, final norm)")] = None,
    census: Annotated[bool, typer.Option(help="print every MatMul/Gemm/Conv with its quantized operands")] = False,
    text_len: Annotated[int | None, typer.Option(min=1, help="text tokens the graph takes (the pipeline's max_sequence_length; "
                                                            "SD3: CLIP's 77 + T5's); default per architecture")] = None,
    sample_size: Annotated[int | None, typer.Option(min=1, help="latent height = width the graph takes (default: the model "
                                                               "config's sample_size; Flux: 128)")] = None,
    time_ids: Annotated[int | None, typer.Option(min=1, help="SDXL-style UNet: micro-conditioning time ids the graph "
                                                            "takes, 6 (base) or 5 (refiner: aesthetic score); default: "
                                                            "from its pipeline directory")] = None,
    trt_dtype: Annotated[TrtDtype, typer.Option(help="16-bit type the quantized TensorRT graphs compute in outside "
                                                     "their Q/DQ (bfloat16 for models whose activations overflow fp16)")]
    = TrtDtype.float16,
    memory_check: Annotated[bool, typer.Option(help="refuse up front an export whose planned peak memory or disk "
                                                    "space exceeds what is available")] = True,
    load_dtype: Annotated[LoadDtype, typer.Option(
        help="dtype the model is loaded, quantized and checked in: auto = float32, or float16 when float32 would not "
             "fit in memory; float16 also quantizes a 16-bit checkpoint as it ships (not with fp32)")] = LoadDtype.auto,
    time_embedding_input: Annotated[bool, typer.Option(
        "--time-embedding-input", help="graphs take the per-block time embeddings (a slots x dim input) instead of "
                                       "the timestep, so a schedule can feed learned MTEO rows (distill-embeddings); "
                                       "plain schedules get the model's own rows")] = False,
    wait: Wait = 3600.0,
    force: Annotated[bool, typer.Option("--force", help="replace a build of another model in OUT/<model-id>, or write "
                                                        "into a folder there that is not a tmpdiff build")] = False,
) -> None:
    """Export a denoiser to ONNX, one graph per precision (plus a TensorRT graph per quantized precision)."""
    from tmpdiff.commands.export import calibration_for, resolve_model_dir
    from tmpdiff.export.exporter import check_build_model, export_build_dir, export_model, parse_precisions
    from tmpdiff.export.report import print_census, print_export_table
    from tmpdiff.formats.precisions import HIGH_PRECISION_PATTERNS

    names = parse_precisions(precisions)
    model_dir = resolve_model_dir(model, subfolder)
    if model_id is None and model in ("bundled", "bundled-t2i"):
        model_id = {"bundled": "tiny-dit", "bundled-t2i": "tiny-t2i"}[model]
    if text_len is None and model == "bundled-t2i":
        from tmpdiff.models.tiny_t2i import TEXT_LEN

        text_len = TEXT_LEN
    keep = tuple(p.strip() for p in keep_high_precision.split(",") if p.strip()) if keep_high_precision is not None \
        else HIGH_PRECISION_PATTERNS
    from tmpdiff.formats.precisions import get_precision

    check_build_model(export_build_dir(model_dir, out, model_id), model_dir, force)  # before any capture runs
    calibration, sampling = calibration_for(model_dir, _seed_list(calib_seeds, "--calib-seeds"),
                                             None if calib_classes is None else _int_list(calib_classes, "--calib-classes"),
                                             prompts=prompts, steps=calib_steps, guidance=calib_guidance,
                                             random=random_calibration, random_batches=random_batches,
                                             needed=any(get_precision(n).modelopt_cfg is not None for n in names))
    build_dir, outcomes = export_model(model_dir, out, names, model_id=model_id, calibration=calibration,
                                       keep_high_precision=keep, on_progress=lambda msg: console.print(msg),
                                       sampling=sampling, graph_sizes={"text_len": text_len, "sample_size": sample_size,
                                                    "time_ids": time_ids},
                                       wait=wait, trt_dtype=trt_dtype.value, memory_check=memory_check,
                                       time_embedding_input=time_embedding_input, load_dtype=load_dtype.value,
                                       replace=force)
    print_export_table(outcomes)
    if census:
        for outcome in outcomes:
            print_census(outcome)
    typer.echo(f"manifest: {build_dir / 'manifest.json'}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TmpdiffError(f"{option} must be comma-separated integers, got {text!r}") from None


def _seed_list(text: str, option: str) -> list[int]:
    """Noise seeds: what torch's generator takes (0..2^63-1), as `run --seed` is checked."""
    from tmpdiff.runtime.runner import check_seeds

    seeds = _int_list(text, option)
    check_seeds(seeds, option)
    return seeds


@app.command()
def build(
    build_dir: Annotated[Path, typer.Argument(help="build directory written by `tmpdiff export` (build/<model-id>)")],
    backend: BackendOpt = BackendName.ort,
    device: DeviceOpt = None,
    precisions: Annotated[str | None, typer.Option(help="comma-separated (default: every exported precision)")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="ORT intra-op threads")] = None,
    batch: Annotated[int, typer.Option(min=1, help="trt: batch of the optimisation profile (latents per call)")] = 20,
    dynamic: Annotated[bool, typer.Option(help="trt: dynamic batch axis (min/opt/max) instead of a static shape")] = False,
    max_batch: Annotated[int | None, typer.Option(min=1, help="trt --dynamic: largest batch")] = None,
    opt_level: Annotated[int, typer.Option(min=0, max=5, help="trt: builder optimisation level")] = 3,
    timing_cache: Annotated[Path | None, typer.Option(help="trt: timing cache file (read if present, then updated)")] = None,
    print_command: Annotated[bool, typer.Option(help="trt: print equivalent trtexec / polygraphy commands and exit")] = False,
    import_plan: Annotated[list[str] | None, typer.Option(help="trt: PRECISION=FILE, register a plan built elsewhere "
                                                                "(repeatable; checked like a plan tmpdiff builds)")] = None,
    wait: Wait = 3600.0,
) -> None:
    """Build an engine for every exported precision (ORT: optimise and save; trt: strongly typed plans)."""
    device, backend = _device(backend, device), backend.value
    from tmpdiff.engines.build import build_engines, trt_commands
    from tmpdiff.engines.loading import check_threads

    check_threads(threads)

    names = None if precisions is None else [p.strip() for p in precisions.split(",") if p.strip()]
    trt_options = None
    if backend == "trt":
        from tmpdiff.engines.trt_build import TrtBuildOptions

        if timing_cache is not None:  # a regular file there is the cache to update; anything else as for an output
            from tmpdiff.formats.outputs import Output, check_outputs

            updating = timing_cache.is_file() and not timing_cache.is_symlink()
            timing_cache = check_outputs([Output.file("--timing-cache", timing_cache)], force=updating,
                                         build_dirs=[build_dir])["--timing-cache"]
        trt_options = TrtBuildOptions(batch=batch, dynamic=dynamic, max_batch=max_batch, optimization_level=opt_level,
                                      timing_cache=timing_cache)
        if import_plan:
            from tmpdiff.engines.build import import_trt_plan

            for item in import_plan:
                name, sep, file = item.partition("=")
                if not sep or not name or not file:
                    raise TmpdiffError(f"--import-plan takes PRECISION=FILE, got {item!r}")
                outcome = import_trt_plan(build_dir, name, Path(file), wait, on_progress=lambda m: console.print(m))
                typer.echo(f"{outcome.precision}\timported\t{outcome.path}")
            return
        if print_command:
            for line in trt_commands(build_dir, names, trt_options):
                typer.echo(line)
            return
    elif print_command or import_plan:
        raise TmpdiffError("--print-command and --import-plan are for --backend trt")
    outcomes = build_engines(build_dir, backend, device, names, threads, on_progress=lambda m: console.print(m),
                             trt_options=trt_options, wait=wait)
    for o in outcomes:
        typer.echo(f"{o.precision}\t{'up to date' if o.skipped else 'built'}\t{o.path}")


@app.command()
def profile(
    build_dir: Annotated[Path, typer.Argument(help="build directory with built engines")],
    out: Annotated[Path, typer.Option(help="costs table to write (format tmpdiff.costs/1)")] = Path("costs.json"),
    backend: BackendOpt = BackendName.ort,
    device: DeviceOpt = None,
    batch: Annotated[int, typer.Option(min=1, help="latents per engine call (with guidance: 2 x samples)")] = 20,
    warmup: Annotated[int, typer.Option(min=0)] = 3,
    repeats: Annotated[int, typer.Option(min=1)] = 20,
    threads: Annotated[int | None, typer.Option(min=1, help="ORT intra-op threads")] = None,
    precisions: Annotated[str | None, typer.Option(help="comma-separated (default: every built precision)")] = None,
    force: Force = False,
    json_output: JsonOutput = False,
) -> None:
    """Measure the median step latency of every built precision and write the costs table."""
    device, backend = _device(backend, device), backend.value
    from rich.progress import Progress
    from rich.table import Table

    from tmpdiff.engines.loading import check_backend, check_threads
    from tmpdiff.engines.profile import profile_build
    from tmpdiff.formats.costs import save_costs
    from tmpdiff.formats.outputs import Output, check_outputs

    check_backend(backend, device)
    check_threads(threads)
    out = check_outputs([Output.file("--out", out, ".json")], force=force, build_dirs=[build_dir])["--out"]
    names = None if precisions is None else [p.strip() for p in precisions.split(",") if p.strip()]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("profiling", total=repeats)
        table = profile_build(build_dir, backend, device, batch, warmup, repeats, threads, names,
                              on_repeat=lambda: progress.advance(task))
    save_costs(table, out)
    if json_output:
        _print_json(table.model_dump(mode="json") | {"wrote": str(out)})
        return
    relative = table.relative("fp32") if "fp32" in table.precisions else {}
    view = Table(title=f"step latency, batch {batch}, {table.device}")
    for column in ("precision", "median ms", "p10 ms", "p90 ms", "vs fp32"):
        view.add_column(column, justify="left" if column == "precision" else "right")
    for name, cost in table.precisions.items():
        view.add_row(name, f"{cost.median_ms:.2f}", f"{cost.p10_ms:.2f}", f"{cost.p90_ms:.2f}",
                     f"{relative[name]:.2f}" if relative else "")
    Console().print(view)
    typer.echo(f"wrote {out}")


@app.command()
def costs(
    device: Annotated[str, typer.Option(help="the target device the ratios are for, e.g. 'H100 SXM'")],
    ratio: Annotated[list[str], typer.Option(help="PRECISION=RATIO pairs, comma-separated (repeatable): the step "
                                                  "cost of each precision relative to the others, e.g. fp16=1,fp8=0.55")],
    source: Annotated[str, typer.Option(help="where the ratios come from (a paper, a vendor table, a run elsewhere)")],
    out: Annotated[Path, typer.Option(help="costs table to write (format tmpdiff.costs/1)")] = Path("costs.json"),
    model_id: Annotated[str | None, typer.Option(help="the model the ratios are for (default: any model)")] = None,
    force: Force = False,
    json_output: JsonOutput = False,
) -> None:
    """Write a costs table stated for a target device (ratios, not measured here) for calibrate and bench."""
    from rich.table import Table

    from tmpdiff.commands.costs import write_stated_costs

    table, out = write_stated_costs(device, ratio, source, out, model_id=model_id, force=force)
    if json_output:
        _print_json(table.model_dump(mode="json") | {"note": table.note(), "wrote": str(out)})
        return
    view = Table(title="step cost ratios")
    for column in ("precision", "ratio"):
        view.add_column(column, justify="left" if column == "precision" else "right")
    for name, value in table.step_costs().items():
        view.add_row(name, f"{value:g}")
    Console().print(view)
    typer.echo(f"costs: {table.note()}")
    typer.echo(f"wrote {out}")


class SolverName(StrEnum):
    dpmsolver = "dpmsolver++"
    ddim = "ddim"


class EmbeddingMethod(StrEnum):
    mteo = "mteo"
    timestep_shift = "timestep-shift"


class DistillLoss(StrEnum):
    both = "both"
    trajectory = "trajectory"
    final = "final"


@app.command("plan-embeddings")
def plan_embeddings(
    build_dir: Annotated[Path, typer.Argument(help="build directory the plan runs on")],
    embeddings: Annotated[Path, typer.Argument(help="time-embeddings file (distill-embeddings: MTEO rows or shifts)")],
    out: Annotated[Path, typer.Option(help="plan to write (tmpdiff.schedule/3, in the embeddings' directory or above)")],
    schedule: Annotated[Path | None, typer.Option(help="take each step's precision from this schedule (same steps)")] = None,
    precision: Annotated[str | None, typer.Option(help="run every step at this precision (default: fp32, or what "
                                                       "quantization-aware embeddings were trained at)")] = None,
    pipeline: Annotated[Path | None, typer.Option(
        callback=_pipeline_path,  # bundled-t2i: the bundled pipeline
        help="text-to-image builds: the pipeline directory whose scheduler "
                                                       "the plan's solver is configured from")] = None,
    force: Force = False,
) -> None:
    """Write a plan (schedule/3) that samples with the embeddings' solver, feeds each step its learned row or
    timestep shift, and runs each step at its precision; `tmpdiff run BUILD --schedule PLAN` executes it (with
    --pipeline DIR --prompt ... for a text-to-image build)."""
    from tmpdiff.commands.plan_embeddings import plan_embeddings as write_plan

    plan = write_plan(build_dir, embeddings, out, schedule=schedule, precision=precision, pipeline=pipeline,
                      force=force)
    typer.echo(f"wrote {out}: {plan.steps} steps of {plan.scheduler.class_name}, {plan.time_embeddings}, "
               f"precisions {','.join(plan.precisions)}")


@app.command("distill-embeddings")
def distill_embeddings(
    model: Annotated[str, typer.Argument(help="class-conditional model directory (tmpdiff_model.json) or 'bundled'; or a "
                                              "text-to-image pipeline directory or 'bundled-t2i'")],
    steps: Annotated[int, typer.Option(min=1, help="N: the few-step schedule's step count")],
    out: Annotated[Path, typer.Option(help="embeddings file to write (.safetensors, tmpdiff.time_embeddings/1)")],
    solver: Annotated[SolverName, typer.Option(help="dpmsolver++ (2M) or ddim (trailing spacing)")] = SolverName.dpmsolver,
    method: Annotated[EmbeddingMethod, typer.Option(help="mteo: a vector per (step, block); timestep-shift: a scalar "
                                                         "per step (baseline)")] = EmbeddingMethod.mteo,
    loss: Annotated[DistillLoss, typer.Option(help="match the reference at the student's timesteps, at the sample, or "
                                                   "both (keep the lower held-out sample error)")] = DistillLoss.both,
    iterations: Annotated[int, typer.Option(min=0, help="optimiser steps per loss")] = 40,
    batch: Annotated[int, typer.Option(min=1, help="trajectories per optimiser step")] = 8,
    train_samples: Annotated[int, typer.Option(min=1, help="training trajectories (noise seed --train-seed)")] = 32,
    reference_steps: Annotated[int, typer.Option(min=2, help="steps of the fp32 DPM-Solver++ reference")] = 50,
    train_seed: Annotated[int, typer.Option(help="noise seed of the training set (keep it apart from evaluation seeds)")] = 1000,
    validation_seed: Annotated[int, typer.Option(help="noise seed of the held-out set that picks the loss")] = 2000,
    prompts: Annotated[Path | None, typer.Option(help="pipelines: training prompts file (one per line; default for "
                                                      "'bundled-t2i': its 270 held-in prompts)")] = None,
    guidance: Annotated[float | None, typer.Option(
        callback=_finite("--guidance"), help="guidance scale the plan will run at (default: the model's or "
                                                        "the pipeline's)")] = None,
    max_sequence_length: Annotated[int | None, typer.Option(min=1, help="pipelines: text tokens, as the engines were "
                                                                        "exported (default: 16 for 'bundled-t2i', else "
                                                                        "the pipeline's)")] = None,
    force: Force = False,
) -> None:
    """Distill per-step, per-block time embeddings (MTEO) for an N-step solver; the backbone stays frozen."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tmpdiff.calibration.mteo import DistillConfig
    from tmpdiff.commands.distill import distill_embeddings as run_distill

    losses = ["trajectory", "final"] if loss is DistillLoss.both else [loss.value]
    cfg = DistillConfig(solver=solver.value, steps=steps, kind=method.value, iterations=iterations, batch=batch,
                        train_samples=train_samples, reference_steps=reference_steps, train_seed=train_seed,
                        validation_seed=validation_seed)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        tasks = {name: progress.add_task(f"{name} loss", total=iterations) for name in losses}
        outcome = run_distill(model, cfg, losses, out, force=force, prompts=prompts, guidance_scale=guidance,
                              max_sequence_length=max_sequence_length,
                              on_progress=lambda name, i, value: progress.update(
                                  tasks[name], completed=i + 1, description=f"{name} loss {value:.4g}"))
    info = outcome.info
    for run in info.runs:
        typer.echo(f"{run.loss}: loss {run.initial:.4g} -> {run.final:.4g}, held-out sample MSE {run.validation_mse:.4g}, "
                   f"{run.seconds:.0f} s wall, {run.cpu_seconds:.0f} s CPU"
                   f"{'  (kept)' if run.loss == info.loss and info.kept == 'learned' else ''}")
    if info.initial_validation_mse is not None:
        what = "the model's own embeddings" if info.kind == "mteo" else "zero shifts"
        verdict = ("kept the trained tensor" if info.kept == "learned" else
                   f"no run beat it: wrote {what} (plain sampling); train longer or on more samples")
        typer.echo(f"{what} before training: held-out sample MSE {info.initial_validation_mse:.4g}; {verdict}")
    typer.echo(f"{info.kind}: {info.trained_parameters:,} trained parameters = {info.parameter_fraction:.3%} of the "
               f"model's {info.model_parameters:,}; timesteps {info.timesteps}")
    typer.echo(f"wrote {outcome.path}")


@app.command()
def run(
    build_dir: Annotated[Path, typer.Argument(help="build directory with built engines")],
    out: Annotated[Path, typer.Option(help="image to write (PNG grid, one sample per class or prompt)")] = Path("sample.png"),
    schedule: Annotated[Path | None, typer.Option(help="schedule or plan: tmpdiff.schedule/1 to /3 (/2: its own timesteps, "
                                                             "/3: MTEO's learned embeddings), or a TMPQ-DM plan "
                                                             "(tmpdiff.tmpq-plan/1 or /2)")] = None,
    precision: Annotated[str | None, typer.Option(help="run every step at this precision instead of a schedule")] = None,
    class_: Annotated[str, typer.Option("--class", help="comma-separated class ids, one sample each")] = "0",
    prompt: Annotated[list[str] | None, typer.Option(help="text prompt (repeatable); needs --pipeline")] = None,
    pipeline: Annotated[Path | None, typer.Option(
        callback=_pipeline_path,  # bundled-t2i: the bundled pipeline
        help="local diffusers pipeline directory whose text encoders, VAE and "
                                                       "scheduler run around the engines (with --prompt; with --class "
                                                       "for a pipeline that takes class labels, e.g. DiTPipeline)")] = None,
    batch: Annotated[int, typer.Option(min=1, help="samples per class or prompt")] = 1,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="must equal the schedule's length")] = None,
    guidance: Annotated[float | None, typer.Option(
        callback=_finite("--guidance"), help="classifier-free guidance scale (default: the model's, or the "
                                                        "pipeline's with --pipeline)")] = None,
    backend: BackendOpt = BackendName.ort,
    device: DeviceOpt = None,
    threads: Annotated[int | None, typer.Option(min=1, help="ORT intra-op threads")] = None,
    trace: Annotated[Path | None, typer.Option(help="write a Chrome trace (one event per step) here")] = None,
    nan_guard: Annotated[bool, typer.Option(help="re-run a step whose output is not finite at the next higher precision "
                                                 "(on a GPU this reads one flag per step)")] = True,
    parallel: Annotated[int, typer.Option(min=1, help="DRiffusion draft-and-refine sampling with N workers (1: sequential; with "
                                                               "--pipeline the denoiser drafts ahead and the pipeline's "
                                                               "own scheduler refines)")] = 1,
    mode: Annotated[SamplingMode | None, typer.Option(help="--parallel: conservative (default): n+1 steps per 2 rounds "
                                                           "of calls; aggressive: n per round")] = None,
    draft_min_alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="--pipeline --parallel: keep steps whose "
                                                   "signal scale alpha is below this sequential (0: draft from the "
                                                   "first step, as the paper)")] = 0.0,
    executor: Annotated[ExecutorName, typer.Option(help="local: a round's N calls one after another here (same samples); "
                                                       "ray: Ray actors (with --pipeline: the drafts)")] = ExecutorName.local,
    address: Annotated[str | None, typer.Option(help="an existing Ray cluster (with --executor ray; default: start a local "
                                                     "one)")] = None,
    force: Force = False,
    json_output: JsonOutput = False,
) -> None:
    """Sample with a per-step precision schedule; print the per-step table; write the image (and a trace)."""
    device, backend = _device(backend, device), backend.value
    from tmpdiff.eval.images import grid_image, save_png
    from tmpdiff.formats.outputs import Output, check_outputs

    if prompt is not None and pipeline is None:
        raise TmpdiffError("--prompt and --pipeline go together (text-conditioned models run inside their diffusers pipeline)")
    if draft_min_alpha and (pipeline is None or parallel == 1):
        raise TmpdiffError("--draft-min-alpha applies to --pipeline --parallel N (N > 1)")
    if mode is not None and parallel == 1:
        raise TmpdiffError("--mode applies to --parallel N (N > 1)")
    mode = mode or SamplingMode.conservative
    targets = [Output.file("--out", out, ".png")] + ([Output.file("--trace", trace, ".json")] if trace else [])
    from tmpdiff.formats.schedule import files_read

    paths = check_outputs(targets, force=force, inputs=[*files_read(schedule), pipeline], build_dirs=[build_dir])
    extra: dict = {}
    options = {"seed": seed, "steps": steps, "schedule_path": schedule, "precision": precision, "backend": backend,
               "device": device, "threads": threads, "guidance_scale": guidance, "nan_guard": nan_guard}
    from tmpdiff.commands.run import check_sample_rows

    if pipeline is None:
        from tmpdiff.commands.run import check_pixel_space

        check_pixel_space(build_dir)
    conditions = len(prompt) if prompt is not None else len(_int_list(class_, "--class"))
    check_sample_rows(build_dir, conditions * batch, backend, device, guidance, pipeline is not None)
    if pipeline is not None:  # prompts, or the class labels of a pipeline that takes them (DiTPipeline)
        from tmpdiff.commands.run_prompts import PromptRequest, run_prompts

        labels = None if prompt is not None else [c for c in _int_list(class_, "--class") for _ in range(batch)]
        request = PromptRequest(build_dir=build_dir, pipeline_dir=pipeline,
                                prompts=[p for p in prompt or [] for _ in range(batch)], class_labels=labels,
                                parallel=parallel, mode=mode.value, min_alpha=draft_min_alpha,
                                executor=executor.value, address=address, **options)
        images, denoiser, source = run_prompts(request)
        steps_run = denoiser.trace
        title = f"{source}, {len(request.prompts)} prompts" if labels is None else f"{source}, classes {labels}"
        if denoiser.drafts is not None:
            title += f", {mode.value} drafts for {parallel} workers: {denoiser.drafts.rounds} rounds of denoiser calls"
            extra = {"parallel": parallel, "mode": mode.value, "executor": executor.value, "rounds": denoiser.drafts.rounds}
            if denoiser.draft_pool_startup is not None:
                extra["ray_startup_s"] = denoiser.draft_pool_startup
    else:
        from tmpdiff.commands.run import RunRequest
        from tmpdiff.commands.run import run as run_schedule
        from tmpdiff.models.digits import to_uint8

        classes = [c for c in _int_list(class_, "--class") for _ in range(batch)]
        request = RunRequest(build_dir=build_dir, classes=classes, parallel=parallel, mode=mode.value,
                             executor=executor.value, address=address, **options)
        with _step_progress(json_output) as on_step:
            result, _, info = run_schedule(request, on_step=on_step)
        images, steps_run = to_uint8(result.latents.cpu()), result.trace
        title = f"{info['source']}, {len(classes)} samples, guidance {info['guidance_scale']}"
        if parallel > 1:
            title += f", {mode.value} on {parallel} {executor.value} workers: {info['rounds']} rounds of denoiser calls"
            extra = {k: info[k] for k in ("parallel", "mode", "executor", "rounds", "ray_startup_s") if k in info}
    save_png(grid_image(images, rows=1), paths["--out"])
    if trace is not None:
        steps_run.write_chrome_trace(paths["--trace"])
    if json_output:
        _print_json({"source": title, "steps": [vars(e) for e in steps_run.steps], "switches": steps_run.switches,
                     "fallbacks": len(steps_run.fallbacks), "wrote": [str(p) for p in paths.values()], **extra})
        return
    _print_steps(steps_run, title)
    for path in paths.values():
        typer.echo(f"wrote {path}")


@contextlib.contextmanager
def _step_progress(quiet: bool):
    """A transient progress bar on stderr, started at the first denoising step (so an error before sampling is one
    clean line) and advanced once per step; nothing in --json mode."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                        transient=True)
    task = None

    def on_step(event) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("sampling", total=None)
        progress.update(task, completed=event.index + 1)

    try:
        yield on_step
    finally:
        if task is not None:
            progress.stop()


def _print_json(payload) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def _print_steps(trace, title: str) -> None:
    """The per-step table (step, timestep, precision, ms) and totals."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("step", "timestep", "precision", "ms"):
        table.add_column(column, justify="right" if column != "precision" else "left")
    for event in trace.steps:
        label = event.precision + (f" (fallback from {event.fallback_from})" if event.fallback_from else "")
        table.add_row(str(event.index), str(event.timestep), label, f"{event.seconds * 1e3:.2f}")
    Console().print(table)
    total = sum(e.seconds for e in trace.steps)
    typer.echo(f"total {total * 1e3:.1f} ms over {len(trace.steps)} steps, {trace.switches} engine switches, "
               f"{len(trace.fallbacks)} NaN/Inf fallbacks")


def _check_fanout(workers: int | None, address: str | None, pipeline: Path | None) -> None:
    if address is not None and workers is None:
        raise TmpdiffError("--address needs --workers (how many Ray actors evaluate schedules)")
    if workers is not None and pipeline is not None:
        raise TmpdiffError("--workers fans out class-conditional calibration; a --pipeline session runs in this process")


@app.command()
def calibrate(
    build_dir: Annotated[Path, typer.Argument(help="build directory with built engines")],
    costs: CostsOpt,
    out: Annotated[Path, typer.Option(help="schedule to write (tmpdiff.schedule/1; /2 with --timesteps-from)")] = Path("schedule.json"),
    speedup: Annotated[float | None, typer.Option(help="target speedup over the all-reference schedule")] = None,
    max_error: Annotated[float | None, typer.Option(help="quality floor: largest error on --metric")] = None,
    min_ssim: Annotated[float | None, typer.Option(help="quality floor: smallest mean SSIM vs the reference")] = None,
    steps: Annotated[int | None, typer.Option(min=2, help="denoising steps (default: the model's)")] = None,
    timesteps_from: Annotated[Path | None, typer.Option(help="sample at the timesteps this TMPQ-DM plan or v2+ schedule "
                                                             "chose (every schedule tried, the reference too): "
                                                             "per-step precision over chosen timesteps")] = None,
    metric: Annotated[str | None, typer.Option(help="error the search minimises: latent (relative MSE) or ssim (1 - "
                                                    "SSIM); default ssim with --min-ssim, else latent")] = None,
    method: Annotated[str, typer.Option(help="sensitivity (profile + exact knapsack) or bisection (segment bisection, "
                                             "speedup targets only)")] = "sensitivity",
    tolerance: Annotated[float, typer.Option(min=0.0, help="adaptive sensitivity sampling: interpolate when within this")] = 0.05,
    refine: Annotated[bool, typer.Option(help="refine the knapsack schedule with real evaluations (level swaps while "
                                              "they help), within 3*T*L evaluations in all (a quality floor: plus 2 "
                                              "per budget bisection step)")] = True,
    reference: Annotated[str, typer.Option(help="reference precision")] = "fp32",
    calib_seeds: Annotated[str, typer.Option(help="noise seeds of the calibration set")] = "0,1",
    calib_classes: Annotated[str | None, typer.Option(help="classes of the calibration set (default: all; with --pipeline: "
                                                         "the class labels of a pipeline that takes them, DiTPipeline)")]
    = None,
    report: Annotated[Path | None, typer.Option(help="also write calibration_report.md + plots to this directory")] = None,
    pipeline: Annotated[Path | None, typer.Option(
        callback=_pipeline_path,  # bundled-t2i: the bundled pipeline
        help="text-conditioned builds: the diffusers pipeline directory the "
                                                       "engines run in (its scheduler, steps and guidance)")] = None,
    prompts: Annotated[Path | None, typer.Option(help="--pipeline: prompts file (one per line), each sampled from "
                                                      "every --calib-seeds seed")] = None,
    guidance: Annotated[float | None, typer.Option(
        callback=_finite("--guidance"), help="--pipeline: guidance scale (default: the pipeline's)")] = None,
    backend: BackendOpt = BackendName.ort,
    device: DeviceOpt = None,
    threads: Annotated[int | None, typer.Option(min=1, help="ORT intra-op threads")] = None,
    workers: WorkersOpt = None,
    address: ClusterOpt = None,
    force: Force = False,
) -> None:
    """Search a per-step precision schedule (TMPDiff) and write schedule.json."""
    if prompts is not None and pipeline is None:
        raise TmpdiffError("--pipeline and --prompts go together (a text-conditioned build calibrates inside its pipeline)")
    if pipeline is not None and prompts is None and calib_classes is None:
        raise TmpdiffError("--pipeline needs its samples: --prompts FILE, or --calib-classes for a pipeline that takes "
                           "class labels (DiTPipeline)")
    _check_fanout(workers, address, pipeline)
    device, backend = _device(backend, device), backend.value
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tmpdiff.calibration.calibrate import Target, check_method, fallback_note
    from tmpdiff.calibration.calibrate import calibrate as run_calibration
    from tmpdiff.calibration.session import open_session
    from tmpdiff.engines.loading import check_threads
    from tmpdiff.formats.manifest import load_manifest
    from tmpdiff.formats.outputs import Output, check_outputs
    from tmpdiff.formats.schedule import save_schedule

    target = Target(speedup, max_error, min_ssim)
    check_method(method, target)
    if metric is None:  # an SSIM floor is met by placing the cheap steps where they cost the least SSIM
        metric = "ssim" if min_ssim is not None else "latent"
    check_threads(threads)
    # what `calibration.report.write_report` and the pipeline's report (`commands.calibrate_pipeline`) write there
    report_files = ("calibration_report.md", "validation.json", "sensitivities.png", "score_fit.png", "images.png",
                    "calibration_report.json", "grid.png")
    targets = [Output.file("--out", out, ".json")] + ([Output.folder("--report", report, report_files)] if report else [])
    inputs = [costs, *(p for p in (prompts, timesteps_from, pipeline) if p is not None)]
    paths = check_outputs(targets, force=force, inputs=inputs, build_dirs=[build_dir])
    out, report = paths["--out"], paths.get("--report")
    if pipeline is not None:
        from tmpdiff.commands.calibrate_pipeline import calibrate_pipeline, print_result

        labels = None if calib_classes is None else _int_list(calib_classes, "--calib-classes")
        result, session, judged = calibrate_pipeline(
            build_dir, costs, pipeline, prompts, _seed_list(calib_seeds, "--calib-seeds"), target, class_labels=labels,
            steps=steps,
            metric=metric, method=method, tolerance=tolerance, reference=reference, guidance=guidance, backend=backend,
            device=device, threads=threads, report=report, on_progress=lambda m: console.print(m),
            timesteps_from=timesteps_from, refine_schedule=refine)
        save_schedule(result.file, out)
        print_result(result, session, judged, metric)
        typer.echo(f"wrote {out}" + (f" and {report / 'calibration_report.json'}" if report else ""))
        return
    timesteps = None
    if timesteps_from is not None:
        from tmpdiff.commands.timesteps_source import timesteps_from as chosen_timesteps

        timesteps = chosen_timesteps(timesteps_from, load_manifest(build_dir), steps)
        steps = len(timesteps)
    steps = steps or load_manifest(build_dir).require_sampling(build_dir).default_steps
    classes = None if calib_classes is None else _int_list(calib_classes, "--calib-classes")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("reference run", total=None)
        count = {"n": 0}

        def on_evaluation(evaluation) -> None:
            count["n"] += 1
            fell = f" (fell back at {evaluation.fallbacks} step(s))" if evaluation.fallbacks else ""
            progress.update(task, description=f"{count['n']} evaluations, last error {evaluation.error(metric):.3g}"
                                              f"{fell}")

        from tmpdiff.calibration.calibrate import check_target

        session = open_session(build_dir, costs, steps, metric, reference, classes, _seed_list(calib_seeds, "--calib-seeds"),
                               backend, device, threads, on_evaluation=on_evaluation,
                               check=lambda problem: check_target(problem, target), workers=workers, address=address,
                               on_notice=console.print, timesteps=timesteps)
        try:
            result = run_calibration(session, target, method, tolerance, refine_schedule=refine)
            save_schedule(result.file, out)  # before the report: the search's result is kept whatever happens after
            if report is not None:
                from tmpdiff.calibration.report import write_calibration_report

                progress.update(task, description="validation report")
                write_calibration_report(session, result, report)
        finally:
            session.evaluator.close()
    f = result.file
    typer.echo(f"schedule: {' '.join(f.precisions)}" + (f" at timesteps {f.timesteps}" if f.timesteps else ""))
    typer.echo(f"predicted speedup {f.predicted.speedup:.3f}x, measured speedup {f.measured.speedup:.3f}x "
               f"(schedule {f.measured.schedule_ms:.1f} ms, all-{f.reference} {f.measured.reference_ms:.1f} ms, median of "
               f"{f.measured.repeats}, {f.measured.device})")
    typer.echo(f"measured error {f.measured.error:.4g} ({metric}), SSIM {f.measured.ssim:.4f}, {f.evaluations} evaluations")
    note = fallback_note(session.evaluator)
    if note:
        typer.echo(note)
    typer.echo(f"costs: {session.costs.note()}")
    typer.echo(f"wrote {out}" + (f" and {report / 'calibration_report.md'}" if report else ""))


@app.command()
def bench(
    build_dir: Annotated[Path, typer.Argument(help="build directory with built engines")],
    costs: CostsOpt,
    out: Annotated[Path, typer.Option(help="output directory (bench.json, bench.md, pareto.png)")] = Path("bench-out"),
    steps: Annotated[str | None, typer.Option(help="comma-separated step counts (default 10,20; with --pipeline, "
                                                     "the pipeline's 20)")] = None,
    speedups: Annotated[str, typer.Option(help="comma-separated speedup targets")] = "1.1,1.25,1.4",
    calib_seeds: Annotated[str, typer.Option(help="noise seeds of the calibration set")] = "0,1",
    unseen_seeds: Annotated[str | None, typer.Option(help="seeds every schedule is judged on, never calibrated on (a "
                                                          "multiple of the calibration seeds' count; default 100, 101, ...)")] = None,
    exhaustive: Annotated[bool, typer.Option(help="every schedule judged, the optimum to compare with, where L^T "
                                                  "<= 6,561 (two levels: T <= 12; prefix-cached; with --pipeline, "
                                                  "through the pipeline)")] = True,
    exhaustive_levels: Annotated[str | None, typer.Option(help="levels of the exhaustive walk, the reference among "
                                                               "them (default: the reference and the cheapest; with "
                                                               "three, budgets at --speedups)")] = None,
    reference: Annotated[str, typer.Option(help="reference precision (must be in the costs table)")] = "fp32",
    pipeline: Annotated[Path | None, typer.Option(
        callback=_pipeline_path,  # bundled-t2i: the bundled pipeline
        help="text-conditioned builds: the diffusers pipeline directory the "
                                                       "engines run in (its scheduler and guidance)")] = None,
    prompts: Annotated[Path | None, typer.Option(help="--pipeline: calibration prompts file (one per line)")] = None,
    unseen_prompts: Annotated[Path | None, typer.Option(help="--pipeline: prompts every schedule is judged on with the "
                                                             "unseen seeds (default: --prompts)")] = None,
    calib_classes: Annotated[str | None, typer.Option(help="--pipeline taking class labels (DiTPipeline): the "
                                                           "calibration set's labels, instead of --prompts")] = None,
    unseen_classes: Annotated[str | None, typer.Option(help="--pipeline taking class labels: labels every schedule is "
                                                            "judged on with the unseen seeds (default: "
                                                            "--calib-classes)")] = None,
    guidance: Annotated[float | None, typer.Option(
        callback=_finite("--guidance"), help="--pipeline: guidance scale (default: the pipeline's)")] = None,
    refine_evaluations: Annotated[int | None, typer.Option(min=0, help="--pipeline: at most this many evaluations of "
                                                                       "refinement per target (default: up to 3*T*L "
                                                                       "in all)")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="ORT intra-op threads")] = None,
    workers: WorkersOpt = None,
    address: ClusterOpt = None,
    force: Force = False,
) -> None:
    """TMPDiff vs uniform, heuristic, evolutionary and exhaustive schedules at several speedup targets."""
    if pipeline is not None and (prompts is None) == (calib_classes is None):
        raise TmpdiffError("--pipeline needs its samples: --prompts FILE, or --calib-classes for a pipeline that takes "
                           "class labels (DiTPipeline)")
    if pipeline is None and prompts is not None:
        raise TmpdiffError("--pipeline and --prompts go together (a text-conditioned build is benched inside its pipeline)")
    _check_fanout(workers, address, pipeline)
    if pipeline is None and (unseen_prompts is not None or calib_classes is not None or unseen_classes is not None
                             or guidance is not None or refine_evaluations is not None):
        raise TmpdiffError("--unseen-prompts, --calib-classes, --unseen-classes, --guidance and --refine-evaluations "
                           "need --pipeline")
    if (prompts is None and unseen_prompts is not None) or (calib_classes is None and unseen_classes is not None):
        raise TmpdiffError("--unseen-prompts goes with --prompts, --unseen-classes with --calib-classes")
    from tmpdiff.calibration.bench import bench as run_bench
    from tmpdiff.engines.loading import check_threads
    from tmpdiff.formats.outputs import Output, check_outputs
    from tmpdiff.models.bundled import bundled_dir

    try:
        targets = [float(v) for v in speedups.split(",") if v.strip()]
    except ValueError:
        raise TmpdiffError(f"--speedups must be comma-separated numbers, got {speedups!r}") from None
    for target in targets:
        _check_speedup(target, "--speedups")
    check_threads(threads)
    step_counts = _int_list(steps or ("20" if pipeline else "10,20"), "--steps")
    walk_levels = None if exhaustive_levels is None else [p.strip() for p in exhaustive_levels.split(",") if p.strip()]
    if walk_levels is not None:  # asked for by name: a walk that cannot happen is refused, not skipped in silence
        from tmpdiff.calibration.exhaustive import too_many_to_walk

        if not exhaustive:
            raise TmpdiffError("--exhaustive-levels names the exhaustive walk's levels: drop --no-exhaustive")
        over = next(filter(None, (too_many_to_walk(len(set(walk_levels)), n) for n in step_counts)), None)
        if over:
            raise TmpdiffError(f"--exhaustive-levels: {over}")
    # what `calibration.bench` / `pipeline_bench` write there (the exhaustive table only through a pipeline)
    written = ("bench.json", "bench.md", "pareto.png", *(f"exhaustive_T{n}.npz" for n in (step_counts if pipeline else [])))
    out = check_outputs([Output.folder("--out", out, written)], force=force,
                        inputs=[costs, pipeline, prompts, unseen_prompts], build_dirs=[build_dir])["--out"]
    progress = _elapsed_progress()
    if pipeline is not None:
        from tmpdiff.calibration.pipeline_bench import pipeline_bench
        from tmpdiff.runtime.capture import read_prompts

        seeds = _seed_list(calib_seeds, "--calib-seeds")
        if calib_classes is not None:  # a pipeline that takes class labels: refused by name if this one does not
            calib: list = _int_list(calib_classes, "--calib-classes")
            unseen = calib if unseen_classes is None else _int_list(unseen_classes, "--unseen-classes")
        else:
            calib = read_prompts(prompts)
            unseen = calib if unseen_prompts is None else read_prompts(unseen_prompts)
        pipeline_bench(build_dir, costs, out, pipeline, calib, seeds, unseen,
                       [100 + i for i in range(len(seeds))] if unseen_seeds is None
                       else _seed_list(unseen_seeds, "--unseen-seeds"),
                       step_counts, targets, guidance=guidance, reference=reference,
                       threads=threads, refine_evaluations=refine_evaluations, on_progress=progress,
                       exhaustive=exhaustive, exhaustive_at=walk_levels)
        typer.echo(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'pareto.png'}")
        return
    classifier = bundled_dir() / "classifier"
    report = run_bench(build_dir, costs, out, step_counts, targets,
                       _seed_list(calib_seeds, "--calib-seeds"),
                       threads, classifier if classifier.is_dir() else None, on_progress=progress,
                       reference=reference, exhaustive=exhaustive,
                       unseen_seeds=None if unseen_seeds is None else _seed_list(unseen_seeds, "--unseen-seeds"),
                       workers=workers, address=address, exhaustive_at=walk_levels)
    typer.echo(f"costs: {report['costs_table']['note']}")
    typer.echo(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'pareto.png'}")


@app.command()
def check(
    build_dir: Annotated[Path, typer.Argument(help="build directory to validate")],
    schedule: Annotated[list[Path] | None, typer.Option(help="schedule file(s) to check against the build")] = None,
    spot_check: Annotated[bool, typer.Option(help="run each built engine on its recorded check input")] = True,
    json_output: JsonOutput = False,
) -> None:
    """Validate a build directory: manifest, hashes, ONNX graphs, engines, schedules, a numerical spot check."""
    from tmpdiff.commands.check import calibration_notes, check_build

    unchecked: list[str] = []
    problems = check_build(build_dir, schedule, spot_check, unchecked)
    notes = calibration_notes(build_dir)
    if json_output:
        _print_json({"build_dir": str(build_dir), "ok": not problems, "problems": [vars(p) for p in problems],
                     "calibration": notes, "notes": unchecked})
        raise typer.Exit(code=1 if problems else 0)
    for note in [*notes, *unchecked]:  # what each quantized precision was calibrated on (random inputs said plainly), on stderr
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    for problem in problems:
        typer.echo(str(problem))
    if problems:
        raise typer.Exit(code=1)
    typer.echo(f"{build_dir}: ok")


@app.command()
def info(
    build_dir: Annotated[Path, typer.Argument(help="build directory written by `tmpdiff export`")],
    json_output: JsonOutput = False,
) -> None:
    """What a build directory holds: exported precisions, built engines (backend, version, device) and their state."""
    from rich.table import Table

    from tmpdiff.commands.info import build_info

    data = build_info(build_dir)
    if json_output:
        _print_json(data)
        return
    typer.echo(f"{data['model_id']} ({data['architecture']}), {data['format']}, sampling: {data['sampling'] or 'none'}")
    view = Table(title="exported precisions")
    for column in ("precision", "files", "MB", "error vs fp32", "state"):
        view.add_column(column)
    for name, row in data["precisions"].items():
        view.add_row(name, str(row["files"]), f"{row['bytes'] / 1e6:.1f}", f"{row['error_vs_fp32']:.2e}", row["state"])
    Console().print(view)
    view = Table(title="engines")
    for column in ("engine", "backend version", "device", "state"):
        view.add_column(column)
    for key, row in data["engines"].items():
        view.add_row(key, row["backend_version"], row["device"], row["state"])
    Console().print(view)
    if data["mixed"]:
        view = Table(title="deployed layer configurations (TMPQ-DM)")
        for column in ("engine", "layers", "parity", "state"):
            view.add_column(column)
        for name, row in data["mixed"].items():
            layers = ", ".join(f"{p} {n}" for p, n in row["layers"].items())
            view.add_row(name, layers, f"{row['parity_error']:.1e}", row["state"])
        Console().print(view)
    if data["time_embedding_input"]:
        e = data["time_embedding_input"]
        typer.echo(f"graphs take time embeddings: {e['slots']} slots x {e['dim']}, own table of {e['train_timesteps']} "
                   f"timesteps")


@app.command()
def doctor(
    gpu: Annotated[bool, typer.Option("--gpu", help="run the GPU checks (build, kernels, parity, costs, streams, graphs)")] = False,
    work: Annotated[Path, typer.Option(help="--gpu: scratch directory for the bundled model's build")] = Path("gpu-check"),
    results: Annotated[Path, typer.Option(help="--gpu: results root; writes RESULTS/<gpu-name>/gpu_check.json")] = Path("results"),
    force: Force = False,
) -> None:
    """What this machine has for the GPU path (CUDA torch, TensorRT, onnxruntime-gpu); with --gpu, the GPU checks."""
    from tmpdiff.commands.doctor import gpu_check, inventory

    inv = inventory()
    for key, value in vars(inv).items():
        typer.echo(f"{key:<14} {value if value not in (None, []) else '-'}")
    for line in inv.missing():
        typer.echo(f"missing: {line}")
    if not gpu:
        return
    out = gpu_check(work, results, inv, on_line=typer.echo, force=force)
    typer.echo(f"wrote {out}")
    statuses = [r["status"] for r in json.loads(out.read_text())["results"]]
    if "failed" in statuses:
        raise typer.Exit(code=1)
    if "skipped" in statuses:  # not a pass: what was skipped has not been checked on this GPU
        typer.echo(f"incomplete: {statuses.count('skipped')} of {len(statuses)} checks skipped (install what "
                   "'missing:' lists and run again)", err=True)
        raise typer.Exit(code=3)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("demo-out"),
    per_class: Annotated[int, typer.Option(min=1, help="samples per class (one grid row per class; the DiT part)")] = 4,
    steps: Annotated[int | None, typer.Option(min=2, help="denoising steps (default: the model's)")] = None,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    threads: Annotated[int | None, typer.Option(min=1, help="ORT intra-op threads (default: all cores)")] = None,
    precisions: Annotated[str, typer.Option(help="precisions to export and consider (the DiT part; --t2i "
                                                        "uses fp32,int8,fp8,int4)")] = "fp32,fp16,int8,fp8,int4",
    speedup: Annotated[float | None, typer.Option(help="speedup target (default: 60% of the way to the maximum; the "
                                                            "DiT part)")] = None,
    t2i: Annotated[bool, typer.Option(help="also the bundled text-to-image pipeline (OUT/t2i: export with prompt "
                                           "capture, calibration inside the pipeline, grid, report)")] = False,
    force: Force = False,
) -> None:
    """The whole pipeline on the bundled model: export, build, profile, calibrate, sample, report."""
    from tmpdiff.commands.demo import check_demo_request, run_demo
    from tmpdiff.engines.loading import check_threads
    from tmpdiff.export.exporter import parse_precisions
    from tmpdiff.formats.outputs import Output, check_outputs

    check_demo_request(steps, seed)
    names = tuple(parse_precisions(precisions))
    if "fp32" not in names:
        raise TmpdiffError("the demo needs fp32 (the reference) among --precisions")
    if len(names) < 2:  # refused here, not after the export, build and profile
        raise TmpdiffError("the demo calibrates a schedule over precisions: give --precisions at least one besides fp32")
    if speedup is not None:
        _check_speedup(speedup, "--speedup")
    check_threads(threads)
    out = check_outputs([Output.folder("--out", out)], force=force)["--out"]
    report = run_demo(out, per_class=per_class, steps=steps, seed=seed, threads=threads, precisions=names,
                      speedup=speedup, console=console)
    for name, row in report["runs"].items():
        typer.echo(f"{name:<22} accuracy {row['accuracy']:.1%}  median step {row['step_ms_median']:.1f} ms  "
                   f"total {row['total_ms']:.0f} ms")
    typer.echo(f"schedule: {' '.join(report['schedule']['precisions'])}")
    typer.echo(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'grid.png'}")
    if t2i:
        from tmpdiff.commands.demo_t2i import run_t2i_demo

        t2i_report = run_t2i_demo(out / "t2i", steps=steps, seed=seed, threads=threads, console=console)
        for name, row in t2i_report["runs"].items():
            typer.echo(f"t2i {name:<18} adherence {row['adherence']:.1%}  median step {row['step_ms_median']:.1f} ms")
        typer.echo(f"t2i schedule: {' '.join(t2i_report['schedule']['precisions'])}")
        typer.echo(f"wrote {out / 't2i' / 'report.md'}, {out / 't2i' / 'grid.png'}")


class TmpqMetric(StrEnum):
    """What the TMPQ-DM search minimises (tmpdiff/calibration/tmpq_eval.py)."""

    ssim = "ssim"
    latent = "latent"
    confidence = "confidence"
    accuracy = "accuracy"


@app.command("layer-costs")
def layer_costs(
    build_dir: Annotated[Path, typer.Argument(help="build directory with ORT-CPU engines and quantized exports")],
    out: Annotated[Path, typer.Option(help="per-layer costs table to write (tmpdiff.layer-costs/1)")] = Path("layer_costs.json"),
    model: Annotated[str | None, typer.Option(help="what the build was exported from: bundled, bundled-t2i, a pipeline "
                                                   "or model directory (default: the bundled model it was exported "
                                                   "from)")] = None,
    precisions: Annotated[str | None, typer.Option(help="comma-separated (default: every built precision)")] = None,
    batch: Annotated[int, typer.Option(min=1, help="latents per engine call (with guidance: 2 x samples)")] = 20,
    warmup: Annotated[int, typer.Option(min=0)] = 3,
    repeats: Annotated[int, typer.Option(min=1)] = 30,
    threads: Annotated[int | None, typer.Option(min=1, help="ORT intra-op threads")] = None,
    backend: Annotated[BackendName, typer.Option(help="ort: the ORT-CPU engines under ONNX Runtime's profiler; trt: "
                                                      "the TensorRT plans under TensorRT's per-layer profiler (GPU)")] = BackendName.ort,
    force: Force = False,
) -> None:
    """Per-layer costs of every precision's engine (ONNX Runtime's or TensorRT's profiler), with BitOPs, for TMPQ-DM's search."""
    from tmpdiff.commands.search_plan import build_model, layer_costs_command, print_layer_costs

    model = build_model(build_dir, model)
    names = None if precisions is None else [p.strip() for p in precisions.split(",") if p.strip()]
    table = layer_costs_command(build_dir, out, model, names, batch, warmup, repeats, threads, force, console,
                                backend.value)
    print_layer_costs(table, Console())
    typer.echo(f"wrote {out}")


@app.command("search-plan")
def search_plan(
    build_dir: Annotated[Path, typer.Argument(help="build directory with quantized exports")],
    layer_costs: Annotated[Path, typer.Option(help="per-layer costs table (`tmpdiff layer-costs`)")],
    out: Annotated[Path, typer.Option(help="plan to write (tmpdiff.tmpq-plan/2)")] = Path("plan.json"),
    schedule_out: Annotated[Path | None, typer.Option(help="also write a tmpdiff.schedule/2 file when every layer "
                                                           "configuration is one precision (runs with `tmpdiff run`)")] = None,
    model: Annotated[str | None, typer.Option(help="what the build was exported from: bundled, bundled-t2i, a pipeline "
                                                   "or model directory (default: the bundled model it was exported "
                                                   "from)")] = None,
    steps: Annotated[int, typer.Option(min=2, help="denoising steps (one TMPQ-DM timestep group each)")] = 8,
    speedup: Annotated[float, typer.Option(help="budget: predicted speedup over fp32 at --reference-steps")] = 3.0,
    reference_steps: Annotated[int, typer.Option(min=2, help="step count of the fp32 reference")] = 20,
    metric: Annotated[TmpqMetric, typer.Option(help="what the search minimises")] = TmpqMetric.ssim,
    precisions: Annotated[str | None, typer.Option(help="comma-separated per-layer choices (default: every precision "
                                                        "of the costs table; fp32 is always one)")] = None,
    per_step: Annotated[bool, typer.Option(help="a layer configuration per step (default: one for all steps)")] = False,
    max_configs: Annotated[int | None, typer.Option(min=1, help="--per-step: most distinct layer configurations "
                                                              "(engines; default 2)")] = None,
    generations: Annotated[int, typer.Option(min=1)] = 8,
    population: Annotated[int, typer.Option(min=2)] = 50,
    seed: Annotated[int, typer.Option(help="the search's random seed")] = 0,
    calib_seeds: Annotated[str, typer.Option(help="noise seeds the search evaluates on")] = "100",
    holdout_seeds: Annotated[str, typer.Option(help="noise seeds the result is judged on (never searched)")] = "1000,1001,1002,1003,1004",
    max_minutes: Annotated[float | None, typer.Option(min=0.1, help="stop after the generation that passes this")] = None,
    pipeline: Annotated[Path | None, typer.Option(
        callback=_pipeline_path,  # bundled-t2i: the bundled pipeline
        help="text-to-image builds: the diffusers pipeline the candidates "
                                                       "are sampled in (default for --model bundled-t2i: the bundled one)")] = None,
    prompts: Annotated[Path | None, typer.Option(help="--pipeline: prompts the search evaluates on (one per line; "
                                                      "bundled-t2i: 10 of its held-in prompts)")] = None,
    holdout_prompts: Annotated[Path | None, typer.Option(help="--pipeline: prompts the result is judged on with the "
                                                              "held-out seeds (bundled-t2i: its 30 held-out prompts)")] = None,
    guidance: Annotated[float | None, typer.Option(
        callback=_finite("--guidance"), help="--pipeline: guidance scale (default: the pipeline's)")] = None,
    force: Force = False,
) -> None:
    """TMPQ-DM: search timesteps and per-layer precision jointly under a speedup budget; write the plan."""
    from tmpdiff.calibration.tmpq import TmpqOptions
    from tmpdiff.calibration.tmpq_search import SearchSettings
    from tmpdiff.commands.search_plan import build_model, pipeline_sets_for, print_outcome, search_plan_command

    _check_speedup(speedup, "--speedup")
    if max_configs is not None and not per_step:
        raise TmpdiffError("--max-configs applies to --per-step (one layer configuration for all steps otherwise)")
    choices = None if precisions is None else [p.strip() for p in precisions.split(",") if p.strip()]
    if choices is not None and not set(choices) - {"fp32"}:
        raise TmpdiffError(f"--precisions {precisions!r} names no quantized precision: give at least one (fp32 is "
                           "always a choice)")
    model = build_model(build_dir, model if model is not None or pipeline is None else str(pipeline))
    sets = pipeline_sets_for(model, pipeline, prompts, holdout_prompts, guidance)
    select = min(10, population)
    mutations, crossovers = min(25, population // 2), min(10, population // 5)
    settings = SearchSettings(population=population, select=select, mutations=mutations, crossovers=crossovers,
                              generations=generations, consistent=not per_step, max_configs=max_configs or 2, seed=seed,
                              max_seconds=None if max_minutes is None else max_minutes * 60)
    options = TmpqOptions(steps=steps, speedup=speedup, metric=metric.value, reference_steps=reference_steps,
                          seeds=_seed_list(calib_seeds, "--calib-seeds"),
                          holdout_seeds=_seed_list(holdout_seeds, "--holdout-seeds"), settings=settings,
                          precisions=None if choices is None else ["fp32", *(p for p in choices if p != "fp32")])
    outcome = search_plan_command(build_dir, layer_costs, out, schedule_out, model, options, force, console, sets)
    print_outcome(outcome, Console())
    typer.echo(f"wrote {out}" + (f", {schedule_out}" if schedule_out is not None and outcome.plan.uniform_schedule()
                                 else ""))


@app.command("deploy-plan")
def deploy_plan(
    build_dir: Annotated[Path, typer.Argument(help="build directory the plan was searched on")],
    plan: Annotated[Path, typer.Argument(help="TMPQ-DM plan (`tmpdiff search-plan`)")],
    model: Annotated[str | None, typer.Option(help="what the build was exported from: bundled, bundled-t2i, a pipeline "
                                                   "or model directory (default: the bundled model it was exported "
                                                   "from)")] = None,
    wait: Wait = 3600.0,
) -> None:
    """Export a TMPQ-DM plan's mixed-precision layer configurations as ORT engines of the build; then
    `tmpdiff run BUILD --schedule PLAN` executes the plan."""
    from tmpdiff.commands.deploy_plan import deploy_plan as deploy
    from tmpdiff.commands.search_plan import build_model, denoiser_dir

    rows = deploy(build_dir, plan, denoiser_dir(build_model(build_dir, model)), wait=wait, on_progress=lambda m: console.print(m))
    for row in rows:
        layers = ", ".join(f"{p} {n}" for p, n in row.precisions.items())
        parity = "" if row.parity_error is None else f", parity {row.parity_error:.1e}"
        typer.echo(f"{row.name}\t{row.status}\t{layers}{parity}")


def _elapsed_progress() -> Callable[[str], None]:
    """A progress callback printing each message after the time elapsed since it was made (where a long run's time
    goes, phase by phase)."""
    import time

    start = time.monotonic()

    def report(message: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - start), 60)
        console.print(escape(f"[{minutes:3d}:{seconds:02d}] {message}"), highlight=False, soft_wrap=True)

    return report


def _check_speedup(value: float, option: str) -> None:
    """A speedup target is a finite number above 1 (1 is the reference itself)."""
    if not math.isfinite(value) or value <= 1.0:
        raise TmpdiffError(f"{option} must be a finite number above 1, got {value}")


def _quiet_third_party() -> None:
    """In tmpdiff's own process, libraries' advice that does not apply here is not printed: diffusers' and
    transformers' info/warning chatter (e.g. "install accelerate") and modelopt's version notice. Errors still are."""
    import os
    import warnings

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=r"transformers .* is not tested with current version of modelopt")


INTERRUPTED = 130  # 128 + SIGINT: the exit code of a command stopped by Ctrl-C


def _terminated(signum: int, frame) -> None:
    """SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C: in-flight temp files are removed on the way out."""
    console.print("terminated")
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None, *, own_process: bool = True) -> int:
    """Entry point: expected errors become one line on stderr and exit code 2 (tracebacks with --debug).

    `own_process=False` (tests calling it in a process they share) keeps ORT's process-wide thread pool off and leaves
    SIGTERM and Ctrl-C to the host process (turning them into one command's exit code would let the host go on)."""
    from tmpdiff.engines import ort_process
    from tmpdiff.formats.atomic import clear_write_guard

    args = sys.argv[1:] if argv is None else argv
    _quiet_third_party()
    if own_process:
        ort_process.own_process()  # runtime ORT sessions may share one global thread pool
    previous = signal.signal(signal.SIGTERM, _terminated) if own_process else None
    try:
        code = app(args, standalone_mode=False)  # click returns a typer.Exit's code here
        if code == INTERRUPTED:  # typer turns a Ctrl-C (KeyboardInterrupt) that unwound the command into this code
            raise KeyboardInterrupt
    except TmpdiffError as exc:
        if _state["debug"] or "--debug" in args:
            raise
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except (KeyboardInterrupt, typer.Abort) as exc:  # click turns Ctrl-C into Abort
        if not own_process and KeyboardInterrupt in (type(exc), type(exc.__cause__)):
            raise KeyboardInterrupt from None  # Ctrl-C is the host's: a test run stops rather than failing one test
        console.print("interrupted")
        return INTERRUPTED
    except typer.TyperException as exc:  # typer's own click: usage errors, bad option values
        if not hasattr(exc, "format_message"):
            raise
        context = getattr(exc, "ctx", None)
        where = f" (see `{context.command_path} -h`)" if context is not None else ""
        console.print(f"[red]error:[/red] {escape(exc.format_message())}{escape(where)}", highlight=False, soft_wrap=True)
        return exc.exit_code
    finally:
        clear_write_guard()  # the command's inputs and new outputs (`formats.atomic.WriteGuard`) end with it
        if own_process:
            signal.signal(signal.SIGTERM, previous)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
