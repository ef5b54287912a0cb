"""The timesteps another plan chose, for a calibration that keeps them (`tmpdiff calibrate --timesteps-from`).

TMPQ-DM chooses which timesteps run; TMPDiff chooses each step's precision. Calibrating TMPDiff over a TMPQ-DM
plan's timesteps is the combination of the two axes: every schedule the search tries, the all-reference one
included, samples at exactly those timesteps, and the schedule it writes names them (`tmpdiff.schedule/2`).
"""

from __future__ import annotations

from pathlib import Path

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import Manifest
from tmpdiff.formats.schedule import SchedulerRef, load_schedule
from tmpdiff.formats.tmpq_plan import load_tmpq_plan
from tmpdiff.models.schedulers import check_noise_process, sampling_scheduler, scheduler_from, set_custom_timesteps
from tmpdiff.runtime.plan import is_tmpq_plan


def timesteps_from(path: Path, manifest: Manifest, steps: int | None, sampler=None) -> list[int]:
    """The training timesteps a TMPQ-DM plan or a v2+ schedule names, checked against this build: same model,
    same solver as the build samples with (`sampler`: a fresh scheduler of a pipeline's; default the build's
    recorded one), `steps` of them when a step count is given, and timesteps that solver can sample at."""
    scheduler: SchedulerRef | None
    if is_tmpq_plan(path):
        plan = load_tmpq_plan(path)
        if plan.model_id != manifest.model_id:
            raise TmpdiffError(f"the plan is for model {plan.model_id!r}, this build is {manifest.model_id!r}", path)
        if plan.model_sha256 is not None and plan.model_sha256 != manifest.model_sha256:  # (its quantizers do not
            # matter here: only its timesteps are taken)
            raise TmpdiffError(f"the plan was searched on another {plan.model_id!r} (other weights or config)", path)
        timesteps, scheduler = list(plan.timesteps), plan.scheduler
    else:
        schedule = load_schedule(path)
        if schedule.timesteps is None:
            raise TmpdiffError("names no timesteps: give a TMPQ-DM plan or a schedule with `timesteps` "
                               "(tmpdiff.schedule/2 or later)", path)
        timesteps, scheduler = list(schedule.timesteps), schedule.scheduler
    if sampler is None and manifest.sampling is not None:
        sampler = sampling_scheduler(manifest.sampling)
    if scheduler is not None and sampler is not None and scheduler.class_name != type(sampler).__name__:
        raise TmpdiffError(f"its timesteps were chosen for {scheduler.class_name}, this build samples with "
                           f"{type(sampler).__name__}", path)
    if scheduler is not None and sampler is not None:  # the same class on another noise process: other timesteps
        check_noise_process(scheduler_from(scheduler.class_name, scheduler.config, path), sampler.config,
                            "the scheduler its timesteps were chosen for", "this build's", path)
    if steps is not None and steps != len(timesteps):
        raise TmpdiffError(f"names {len(timesteps)} timesteps but --steps is {steps}", path)
    if sampler is not None:
        set_custom_timesteps(sampler, timesteps, path)  # e.g. a timestep past the solver's training timesteps
    return timesteps
