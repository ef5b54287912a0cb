"""`tmpdiff calibrate BUILD --pipeline DIR --prompts FILE` (or `--calib-classes` for a class-label pipeline such as
DiTPipeline): a schedule searched inside a diffusers pipeline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tmpdiff.calibration.calibrate import CalibrationResult, Target, check_target, fallback_note
from tmpdiff.calibration.calibrate import calibrate as run_calibration
from tmpdiff.calibration.pipeline_session import PipelineSession, judge_schedules, open_pipeline_session
from tmpdiff.formats.atomic import write_json
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.schedule import Figures
from tmpdiff.runtime.capture import read_prompts
from tmpdiff.runtime.pipeline_io import default_guidance_of


def calibrate_pipeline(build_dir: Path, costs: Path, pipeline_dir: Path, prompts_file: Path | None, seeds: list[int],
                       target: Target, *, class_labels: list[int] | None = None, steps: int | None = None,
                       metric: str = "latent", method: str = "sensitivity",
                       tolerance: float = 0.05, reference: str = "fp32", guidance: float | None = None,
                       backend: str = "ort", device: str = "cpu", threads: int | None = None,
                       report: Path | None = None, on_evaluation: Callable = lambda _: None,
                       on_progress: Callable[[str], None] = lambda _: None, timing_repeats: int = 3,
                       timesteps_from: Path | None = None,
                       refine_schedule: bool = True) -> tuple[CalibrationResult, PipelineSession, dict | None]:
    """Search the schedule (at the timesteps `timesteps_from` names, when given: a TMPQ-DM plan or a v2+ schedule);
    then judge the reference, the all-cheapest and the chosen schedule (prompt adherence and FD, when the pipeline
    ships an attribute classifier) and record that in the schedule's measured figures. The samples are the prompts
    of `prompts_file`, or `class_labels` for a pipeline that takes them (one of the two), x `seeds`. `refine_schedule`
    as `calibration.calibrate.calibrate`'s."""
    if (prompts_file is None) == (class_labels is None):
        raise TmpdiffError("a pipeline calibrates on --prompts FILE or, when it takes class labels (DiTPipeline), on "
                           "--calib-classes: give one of them")
    conditions = read_prompts(prompts_file) if prompts_file is not None else list(class_labels)
    timesteps = None
    if timesteps_from is not None:
        from tmpdiff.commands.timesteps_source import timesteps_from as chosen_timesteps
        from tmpdiff.formats.manifest import load_manifest

        timesteps = chosen_timesteps(timesteps_from, load_manifest(build_dir), steps, _pipeline_scheduler(pipeline_dir))
        steps = len(timesteps)
    session = open_pipeline_session(build_dir, costs, pipeline_dir, conditions, seeds, steps, metric, reference, guidance,
                                    backend, device, threads, on_evaluation=on_evaluation,
                                    check=lambda problem: check_target(problem, target), timesteps=timesteps)
    try:
        result = run_calibration(session, target, method, tolerance, timing_repeats=timing_repeats,
                                 refine_schedule=refine_schedule)
        problem = session.problem
        compared = {f"all-{problem.reference}": [problem.reference] * problem.steps,
                    f"all-{problem.cheapest}": [problem.cheapest] * problem.steps, "schedule": list(result.schedule)}
        on_progress("judging the reference, the all-cheapest schedule and the chosen one")
        judged = judge_schedules(session, compared)
        if judged is not None:
            extra = {"adherence": judged["schedule"]["adherence"],
                     "adherence_reference": judged[f"all-{problem.reference}"]["adherence"],
                     "fd_vs_reference": judged["schedule"]["fd_vs_reference"], "samples": judged["schedule"]["n"]}
            result.file.measured = Figures(**result.file.measured.model_dump(mode="json"), **extra)
        used = guidance if guidance is not None else default_guidance_of(type(session.evaluator.pipe))
        samples = {"prompts": len(conditions)} if class_labels is None else {"class_labels": list(class_labels)}
        result.file.target = result.file.target | {"pipeline": str(pipeline_dir), **samples, "seeds": list(seeds),
                                                   "guidance_scale": used}
        if report is not None:
            _write_report(report, session, result, compared, judged)
    finally:
        session.evaluator.close()
    return result, session, judged


def _pipeline_scheduler(pipeline_dir: Path):
    """A fresh scheduler of the pipeline's, from its scheduler config (None when it has none that makes one)."""
    from tmpdiff.models.schedulers import load_scheduler

    try:
        return load_scheduler(pipeline_dir / "scheduler")
    except TmpdiffError:
        return None  # loading the pipeline names the problem


def _write_report(directory: Path, session: PipelineSession, result: CalibrationResult, compared: dict,
                  judged: dict | None) -> None:
    """calibration_report.json (figures of the compared schedules) and grid.png (one row per compared schedule)."""
    from tmpdiff.eval.images import grid_image, save_png
    from tmpdiff.eval.t2i import to_uint8

    directory.mkdir(parents=True, exist_ok=True)
    evaluator = session.evaluator
    rows = []
    figures = {}
    for name, schedule in compared.items():
        evaluation = session.problem.evaluate(schedule)
        figures[name] = {"precisions": list(schedule), "latent_error": evaluation.latent_error, "ssim": evaluation.ssim,
                         "psnr": None if evaluation.psnr == float("inf") else evaluation.psnr,
                         **((judged or {}).get(name) or {})}
        rows.append(to_uint8(evaluator.images(schedule) * 2 - 1))
    import numpy as np

    save_png(grid_image(np.concatenate(rows), rows=len(rows)), directory / "grid.png")
    write_json(directory / "calibration_report.json",
               {"schedule": result.file.model_dump(mode="json"), "compared": figures,
                "grid": f"rows: {', '.join(compared)}; columns: {_sample_unit(evaluator)} x seeds"})


def _sample_unit(evaluator) -> str:
    return "class labels" if isinstance(evaluator.conditions[0], int) else "prompts"


def print_result(result: CalibrationResult, session: PipelineSession, judged: dict | None, metric: str) -> None:
    """What `tmpdiff calibrate --pipeline` prints: the schedule, speedups, errors, adherence and FD."""
    import typer

    f = result.file
    typer.echo(f"schedule: {' '.join(f.precisions)}")
    typer.echo(f"predicted speedup {f.predicted.speedup:.3f}x, measured speedup {f.measured.speedup:.3f}x "
               f"(denoiser calls {f.measured.schedule_ms:.1f} ms, all-{f.reference} {f.measured.reference_ms:.1f} ms, "
               f"median of {f.measured.repeats}, {f.measured.device})")
    psnr = "inf" if f.measured.psnr is None else f"{f.measured.psnr:.2f} dB"
    typer.echo(f"measured error {f.measured.error:.4g} ({metric}), latent error {f.measured.latent_error:.4g}, "
               f"SSIM (RGB) {f.measured.ssim:.4f}, PSNR {psnr}, {f.evaluations} evaluations")
    note = fallback_note(session.evaluator)
    if note:
        typer.echo(note)
    for name, row in (judged or {}).items():
        fd = "n/a (one sample)" if row["fd_vs_reference"] is None else f"{row['fd_vs_reference']:.2f}"
        typer.echo(f"{name:<14} adherence {row['adherence']:.1%} of {row['n']}, FD (8-d) vs all-{f.reference} {fd}")
    typer.echo(f"costs: {session.costs.note()}")
