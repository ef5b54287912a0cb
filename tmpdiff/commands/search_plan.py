"""`tmpdiff layer-costs` and `tmpdiff search-plan`: TMPQ-DM's per-layer costs table and joint search."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tmpdiff.calibration.tmpq import TmpqOptions, TmpqOutcome, class_conditional_sets, measure_layer_costs, search_plan
from tmpdiff.commands.export import model_root
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.layer_costs import LayerCostsTable, load_layer_costs, save_layer_costs
from tmpdiff.formats.outputs import Output, check_outputs
from tmpdiff.formats.schedule import save_schedule
from tmpdiff.formats.tmpq_plan import save_tmpq_plan
from tmpdiff.models.bundled import load_model_info


def layer_costs_command(build_dir: Path, out: Path, model: str, precisions: list[str] | None, batch: int, warmup: int,
                        repeats: int, threads: int | None, force: bool, console: Console,
                        backend: str = "ort") -> LayerCostsTable:
    """Measure and write the per-layer costs table; returns it."""
    out = check_outputs([Output.file("--out", out, ".json")], force=force, inputs=[model_root(model)],
                        build_dirs=[build_dir])["--out"]
    with console.status("building the super-network and profiling the engines"):
        table = measure_layer_costs(build_dir, denoiser_dir(model), precisions, batch, warmup, repeats, threads, backend,
                                    on_start=lambda names: console.print(f"profiling {', '.join(names)} interleaved, "
                                                                         f"{repeats} calls each"))
    save_layer_costs(table, out)
    return table


def print_layer_costs(table: LayerCostsTable, console: Console) -> None:
    view = Table(title=f"per-layer ms per call (batch {table.batch}, {table.device}); BitOPs per sample")
    view.add_column("layer")
    view.add_column("MMACs", justify="right")
    for p in table.precisions:
        view.add_column(f"{p} ms", justify="right")
    for layer in table.layers:
        view.add_row(layer.name, f"{layer.macs / 1e6:.1f}", *(f"{layer.ms[p]:.3f}" for p in table.precisions))
    view.add_row("(rest)", "", *(f"{table.rest_ms[p]:.3f}" for p in table.precisions))
    view.add_row("uniform: predicted", "", *(f"{table.config_ms(table.uniform(p)):.2f}" for p in table.precisions))
    view.add_row("uniform: profiled call", "", *(f"{table.step_ms[p]:.2f}" for p in table.precisions))
    view.add_row("uniform: GBitOPs", "", *(f"{table.config_bitops(table.uniform(p)) / 1e9:.1f}" for p in table.precisions))
    console.print(view)


@dataclass(frozen=True)
class PipelineSets:
    """`search-plan --pipeline`: where a text-to-image build's candidates are sampled and judged."""

    pipeline_dir: Path
    prompts: list[str]  # calibration prompts
    holdout_prompts: list[str]  # prompts the result is judged on, with the held-out seeds
    guidance_scale: float | None = None
    files: tuple[Path, ...] = ()  # where the prompts were read from (never overwritten)


def pipeline_sets_for(model: str, pipeline: Path | None, prompts: Path | None, holdout_prompts: Path | None,
                      guidance_scale: float | None) -> PipelineSets | None:
    """`--pipeline DIR --prompts FILE --holdout-prompts FILE` (`--model DIR` of a pipeline implies `--pipeline DIR`);
    `--model bundled-t2i` defaults to the bundled pipeline, 10 of its held-in prompts for the search and its 30
    held-out prompts for the judgement."""
    from tmpdiff.commands.export import BUNDLED_T2I
    from tmpdiff.runtime.capture import read_prompts
    from tmpdiff.runtime.pipeline_io import is_pipeline_dir

    bundled = model == BUNDLED_T2I
    if pipeline is None and not bundled and is_pipeline_dir(Path(model)):
        pipeline = Path(model)
    if pipeline is None and not bundled:
        if prompts is not None or holdout_prompts is not None or guidance_scale is not None:
            raise TmpdiffError("--prompts, --holdout-prompts and --guidance are for text-to-image builds (--pipeline)")
        return None
    if pipeline is None:
        from tmpdiff.models.tiny_t2i import t2i_dir

        pipeline = t2i_dir()
    if not bundled and (prompts is None or holdout_prompts is None):
        raise TmpdiffError("--pipeline needs --prompts (searched on) and --holdout-prompts (judged on)")
    calib = read_prompts(prompts) if prompts is not None else _bundled_prompts(held_out=False)
    held = read_prompts(holdout_prompts) if holdout_prompts is not None else _bundled_prompts(held_out=True)
    return PipelineSets(pipeline, calib, held, guidance_scale, tuple(p for p in (prompts, holdout_prompts) if p))


def build_model(build_dir: Path, model: str | None) -> str:
    """`--model` as given; without it, the bundled model (`bundled` or `bundled-t2i`) whose content hash the build's
    manifest records. Any other model must be named: the manifest holds its hash, not where it lives."""
    from tmpdiff.commands.export import BUNDLED_T2I
    from tmpdiff.formats.manifest import MANIFEST_NAME, load_manifest, recorded_model_hash

    if model is not None:
        return model
    manifest = load_manifest(build_dir)
    for name in ("bundled", BUNDLED_T2I):
        if recorded_model_hash(denoiser_dir(name), manifest.model_sha256) == manifest.model_sha256:
            return name
    raise TmpdiffError(f"the build was not exported from a bundled model (its model id is {manifest.model_id!r}): pass "
                       "--model with the pipeline or model directory it was exported from", build_dir / MANIFEST_NAME)


def denoiser_dir(model: str) -> Path:
    """The denoiser directory `--model` names: `bundled`, `bundled-t2i`, a diffusers pipeline directory (its
    transformer/unet), a tmpdiff class-conditional model directory (its transformer) or a denoiser directory."""
    from tmpdiff.commands.export import BUNDLED_T2I, resolve_model_dir
    from tmpdiff.models.bundled import INFO_NAME
    from tmpdiff.runtime.pipeline_io import is_pipeline_dir, pipeline_denoiser_name

    if model in ("bundled", BUNDLED_T2I):
        return resolve_model_dir(model, None)
    path = Path(model)
    if is_pipeline_dir(path):
        return path / pipeline_denoiser_name(path)
    if (path / INFO_NAME).is_file():
        return load_model_info(path).transformer_dir
    return path


def _bundled_prompts(held_out: bool) -> list[str]:
    """The bundled pipeline's 30 held-out prompts, or 10 of its held-in ones (in their seeded order)."""
    from tmpdiff.commands.distill import bundled_t2i_prompts
    from tmpdiff.models.colored_digits import held_out_combos

    return [c.prompt for c in held_out_combos()] if held_out else bundled_t2i_prompts()[:10]


def search_plan_command(build_dir: Path, layer_costs: Path, out: Path, schedule_out: Path | None, model: str,
                        options: TmpqOptions, force: bool, console: Console,
                        pipeline: PipelineSets | None = None) -> TmpqOutcome:
    """Run the search and write the plan (and, when every configuration is one precision, a v2 schedule)."""
    outputs = [Output.file("--out", out, ".json")]
    if schedule_out is not None:
        outputs.append(Output.file("--schedule-out", schedule_out, ".json"))
    inputs = [layer_costs, model_root(model), *([] if pipeline is None else pipeline.files)]
    paths = check_outputs(outputs, force=force, inputs=inputs, build_dirs=[build_dir])
    table = load_layer_costs(layer_costs)
    if pipeline is None:
        info = load_model_info(model)
        model_dir = info.transformer_dir
        sets = class_conditional_sets(build_dir, info.classifier_dir, options)
    else:
        from tmpdiff.calibration.tmpq import check_held_out
        from tmpdiff.calibration.tmpq_pipeline import pipeline_sets

        check_held_out({"seeds": options.seeds, "prompts": pipeline.prompts},  # before the pipeline loads
                       {"seeds": options.holdout_seeds, "prompts": pipeline.holdout_prompts})
        model_dir = denoiser_dir(str(pipeline.pipeline_dir))
        with console.status("loading the pipeline"):
            sets = pipeline_sets(build_dir, pipeline.pipeline_dir, pipeline.prompts, pipeline.holdout_prompts, options,
                                 pipeline.guidance_scale)
    generations = options.settings.generations
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("generations", total=generations)

        def on_generation(record: dict) -> None:
            progress.update(task, completed=record["generation"] + 1,
                            description=f"generation {record['generation']}: best {record['best_fitness']:.4f}, "
                                        f"{record['evaluations']} evaluated, {_discarded(record)}")

        outcome = search_plan(build_dir, model_dir, table, options, sets, on_generation,
                              on_status=lambda message: progress.update(task, description=message),
                              table_file=layer_costs)
    save_tmpq_plan(outcome.plan, paths["--out"])
    schedule = outcome.plan.uniform_schedule()
    if schedule_out is not None:
        if schedule is None:
            console.print("[yellow]--schedule-out not written: the plan mixes precisions inside a step's layers, which "
                          "no built engine runs yet[/yellow]")
        else:
            save_schedule(schedule, paths["--schedule-out"])
    return outcome


def _discarded(counts: dict) -> str:
    """Candidates discarded unevaluated: over the budget, and (per-step mode) over the configuration cap."""
    text = f"{counts['over_budget']} over budget"
    return text + (f", {counts['over_cap']} over the configuration cap" if counts["over_cap"] else "")


def print_outcome(outcome: TmpqOutcome, console: Console) -> None:
    plan = outcome.plan
    counts = {p: sum(c.count(p) for c in plan.step_precisions()) for p in {p for c in plan.configs for p in c}}
    console.print(f"timesteps {plan.timesteps}; {len(plan.configs)} layer configuration(s); layer-steps by precision "
                  f"{dict(sorted(counts.items()))}; predicted {plan.predicted['speedup']:.2f}x over fp32 at "
                  f"{plan.reference['steps']} steps; {outcome.result.evaluations} evaluations, "
                  f"{_discarded(vars(outcome.result))}, {outcome.result.seconds:.0f} s")
    weights = plan.predicted["engine_weight_bytes"]
    console.print(f"engine weights in memory: {sum(weights.values()) / 2**20:.2f} MiB for {len(weights)} configuration(s) "
                  f"(fp32 engine: {plan.predicted['fp32_weight_bytes'] / 2**20:.2f} MiB)")
    view = Table(title=f"held-out seeds {plan.measured['holdout']['seeds']}")
    for column in ("plan", "accuracy", "confidence", "SSIM vs ref", "PSNR", "pred. speedup", "BitOPs vs ref"):
        view.add_column(column, justify="left" if column == "plan" else "right")
    results = outcome.holdout
    ref_bitops = next(iter(results.values()))["bitops_per_sample"]
    for name, r in results.items():
        view.add_row(name, f"{r['accuracy']:.3f}", f"{r['confidence']:.5f}", f"{r['ssim']:.4f}", f"{r['psnr']:.2f}",
                     f"{r['predicted_speedup']:.2f}x", f"{r['bitops_per_sample'] / ref_bitops:.3f}")
    console.print(view)
