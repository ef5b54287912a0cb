"""`tmpdiff plan-embeddings`: one plan for MTEO and TMPDiff, a `tmpdiff.schedule/3` that names learned time embeddings.

The plan samples with the solver the embeddings were learned for (its scheduler written into the schedule), runs
each step at the precision a calibrated schedule of the same step count gives it (or one precision, or the
precisions quantization-aware embeddings were trained at), and feeds each step its learned row (MTEO, on graphs
exported with --time-embedding-input) or its timestep shift (graphs that take the timestep).
"""

from __future__ import annotations

import os
from pathlib import Path

from tmpdiff.formats.atomic import read_json_object
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import Manifest, load_manifest
from tmpdiff.formats.outputs import Output, check_outputs
from tmpdiff.formats.precisions import get_precision
from tmpdiff.formats.schedule import Schedule, SchedulerRef, files_read, load_schedule, save_schedule
from tmpdiff.models.schedulers import set_sampling_timesteps
from tmpdiff.models.time_embeddings import load_time_embeddings
from tmpdiff.runtime.pipeline_io import pipeline_scheduler_config
from tmpdiff.runtime.time_conditioning import SOLVER_CLASSES, check_build, load_conditioning, solver_problem


def plan_embeddings(build_dir: Path, embeddings: Path, out: Path, *, schedule: Path | None = None,
                    precision: str | None = None, pipeline: Path | None = None, force: bool = False) -> Schedule:
    """Write a /3 schedule at `out` naming `embeddings` (which must lie in `out`'s directory or below it); the
    solver is configured from the build's sampling info, or for a text-to-image build from `pipeline`'s scheduler."""
    from tmpdiff.calibration.few_step import make_scheduler

    out = check_outputs([Output.file("--out", out, ".json")], force=force,
                        inputs=[embeddings, *files_read(schedule)], build_dirs=[build_dir])["--out"]
    if schedule is not None and precision is not None:
        raise TmpdiffError("give at most one of --schedule (per-step precisions) or --precision")
    _, info = load_time_embeddings(embeddings)
    manifest = load_manifest(build_dir)
    scheduler_config = _scheduler_config(manifest, build_dir, pipeline)
    root = out.resolve().parent
    if not embeddings.resolve().is_relative_to(root):
        raise TmpdiffError(f"the plan names its embeddings relative to its own directory: put {embeddings.name} in "
                           f"{root} (or below) or write the plan beside it", embeddings)
    precisions = _precisions(info.steps, info.precisions, schedule, precision, list(info.timesteps), info.solver)
    missing = sorted(set(precisions) - set(manifest.precisions))
    if missing:
        raise TmpdiffError(f"the plan runs {', '.join(missing)}, which {build_dir} has not exported")
    scheduler = make_scheduler(info.solver, scheduler_config)
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    # no `timesteps` list: the solver's own spacing gives the file's timesteps (checked at run time), and DDIM
    # takes no custom timesteps
    plan = Schedule(steps=info.steps, precisions=precisions,
                    scheduler=SchedulerRef(class_name=type(scheduler).__name__, config=config),
                    time_embeddings=os.path.relpath(embeddings.resolve(), root).replace(os.sep, "/"),
                    reference="fp32" if "fp32" in manifest.precisions else precisions[0],
                    target={"time_embeddings": info.kind, "solver": info.solver,
                            **({"precisions_from": str(schedule)} if schedule is not None else {})})
    conditioning = load_conditioning(plan, out)  # as `run` will read and check it, before anything is written
    check_build(conditioning, manifest, build_dir)
    set_sampling_timesteps(scheduler, plan.steps)
    conditioning.check_timesteps([int(t) for t in scheduler.timesteps])
    save_schedule(plan, out)
    return plan


def _placed_timesteps(given: Schedule, source: Path) -> list[int] | None:
    """The timesteps a schedule's named scheduler spaces its steps at (None when it names no scheduler)."""
    if given.scheduler is None:
        return None
    from tmpdiff.models.schedulers import scheduler_from

    scheduler = scheduler_from(given.scheduler.class_name, given.scheduler.config, source)
    set_sampling_timesteps(scheduler, given.steps)
    return [int(t) for t in scheduler.timesteps]


def _scheduler_config(manifest: Manifest, build_dir: Path, pipeline: Path | None) -> dict:
    """The noise process the solver runs on: the class-conditional build's, or the pipeline's scheduler's."""
    if pipeline is None:
        if manifest.sampling is None:
            raise TmpdiffError("a text-to-image build: pass --pipeline DIR (its scheduler configures the solver)",
                               build_dir)
        return dict(manifest.sampling.scheduler_config)
    if manifest.sampling is not None:
        raise TmpdiffError("--pipeline is for text-to-image builds; this one samples class-conditionally", build_dir)
    return read_json_object(pipeline_scheduler_config(pipeline))


def _precisions(steps: int, trained_at: list[str] | None, schedule: Path | None, precision: str | None,
                timesteps: list[int] | None = None, solver: str | None = None) -> list[str]:
    """Per-step precisions: a calibrated schedule's (same step count, the embeddings' solver when it names its
    scheduler, and the embeddings' `timesteps`: those it names, else those its scheduler places), one precision,
    else what the embeddings were trained at (quantization-aware), else fp32. A schedule that names neither scheduler
    nor timesteps is checked by its step count only."""
    if schedule is not None:
        given = load_schedule(schedule)
        if given.steps != steps:
            raise TmpdiffError(f"{given.steps} steps, the embeddings are for {steps}", schedule)
        if given.scheduler is not None and solver is not None:
            problem = solver_problem(solver, given.scheduler.class_name, given.scheduler.config)
            if problem is not None:
                raise TmpdiffError(f"its precisions were calibrated with {given.scheduler.class_name}, the embeddings "
                                   f"were learned for {solver} ({SOLVER_CLASSES[solver]}): give --precision, or "
                                   f"calibrate with that solver", schedule)
        placed = given.timesteps if given.timesteps is not None else _placed_timesteps(given, schedule)
        if placed is not None and timesteps is not None and list(placed) != list(timesteps):
            raise TmpdiffError(f"its precisions were calibrated at timesteps {list(placed)}, the embeddings sample at "
                               f"{timesteps}: calibrate the schedule at those (calibrate --steps {steps} without "
                               "--timesteps-from) or give --precision", schedule)
        chosen = list(given.precisions)
    elif precision is not None:
        chosen = [get_precision(precision).name] * steps
    else:
        chosen = list(trained_at) if trained_at is not None else ["fp32"] * steps
    if trained_at is not None and chosen != list(trained_at):
        raise TmpdiffError(f"these embeddings were trained for steps at {', '.join(trained_at)} (quantization-aware); "
                           f"the plan asks {', '.join(chosen)}")
    return chosen
