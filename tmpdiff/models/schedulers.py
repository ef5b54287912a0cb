"""Diffusers schedulers, built one way: a class name and a config (from a directory or a build's record).

Custom timesteps (a `tmpdiff.schedule/2` file's `timesteps`) go through the scheduler's own
`set_timesteps(timesteps=[...])`. In diffusers 0.42 that exists and samples at exactly the given timesteps for
DDPM, DPMSolverMultistep, DPMSolverSinglestep, EulerDiscrete, LCM, TCD, FlowMatchEulerDiscrete and FlowMatchLCM,
among others (DPM-Solver refuses them with Karras, exponential or beta sigmas or lu-lambdas). DDIM, UniPC, PNDM,
DEIS, EulerAncestral, LMS, KDPM2 and SA-Solver have no `timesteps=`; Heun repeats every timestep (two calls per
step); SCM and Piflow raise. Which applies is decided by trying it on the configured scheduler, not by names.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tmpdiff.formats.atomic import read_json_object
from tmpdiff.formats.config_values import check_scheduler_counts
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import SamplingInfo
from tmpdiff.formats.schedule import MAX_STEPS, Schedule


def scheduler_from(class_name: str, config: dict[str, Any], source: str | Path | None = None):
    """A fresh diffusers scheduler of this class and config; unknown classes are a named error."""
    import diffusers

    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise TmpdiffError(f"unknown diffusers scheduler {class_name!r}", source)
    # a null value (schedule files written before non-finite numbers were kept) takes the class's default
    config = {k: v for k, v in config.items() if v is not None}
    try:
        check_scheduler_counts(config)  # also a pipeline directory's config, which no schedule validator read
        scheduler = cls.from_config(config)
        # diffusers checks some values (timestep_spacing, final_sigmas_type, ...) only when the steps are set: a probe,
        # once per config (not for dynamic shifting, whose steps need the pipeline's `mu`)
        key = json.dumps([class_name, config], sort_keys=True, default=str)
        if not scheduler.config.get("use_dynamic_shifting") and key not in _PROBED:
            probe = cls.from_config(config)
            probe.set_timesteps(min(4, train_timesteps(scheduler)))
            check_timestep_range(probe, source)
            _PROBED.add(key)
    # RuntimeError: diffusers raises its "not implemented" subclass for an unknown beta_schedule or algorithm_type
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError, RuntimeError) as exc:
        raise TmpdiffError(f"the {class_name} config cannot make a scheduler ({type(exc).__name__}: {exc})",
                           source) from None
    return scheduler


def check_timestep_range(scheduler, source: str | Path | None = None) -> None:
    """Refuse set timesteps outside the training range 0..num_train_timesteps (flow-matching solvers start at the top
    value itself): a `steps_offset` past it made DDIM index past its noise table mid-run."""
    train = train_timesteps(scheduler)
    outside = [float(t) for t in scheduler.timesteps if not 0 <= float(t) <= train]
    if outside:
        raise TmpdiffError(f"the {type(scheduler).__name__} config samples at timestep {outside[0]:g}, outside its "
                           f"{train} training timesteps (steps_offset {scheduler.config.get('steps_offset', 0)}, "
                           f"timestep_spacing {scheduler.config.get('timestep_spacing')!r})", source)


_PROBED: set[str] = set()  # scheduler configs whose steps were set once without an error


def load_scheduler(scheduler_dir: str | Path):
    """A fresh scheduler from a `scheduler_config.json` directory (class taken from the config)."""
    config_path = Path(scheduler_dir) / "scheduler_config.json"
    if not config_path.is_file():
        raise TmpdiffError("no scheduler_config.json", scheduler_dir)
    config = read_json_object(config_path)
    return scheduler_from(config.get("_class_name"), config, config_path)


def sampling_scheduler(sampling: SamplingInfo, source: str | Path | None = None):
    """A fresh scheduler of the class and config a build directory recorded for sampling (`source`: its manifest, for
    errors)."""
    return scheduler_from(sampling.scheduler_class, sampling.scheduler_config, source)


# Config keys that define the model's noise process (what it was trained on); a solver may differ, these may not. Not
# the sampling grid's spacing (`timestep_spacing`): a plan may sample its own, e.g. DDIM 'trailing' for MTEO rows.
NOISE_PROCESS_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas", "prediction_type",
                      "rescale_betas_zero_snr")
# what a scheduler without the key does: one that cannot rescale to zero terminal SNR (Heun, Euler ancestral, ...)
# runs the process unrescaled, as one configured False does
ABSENT_NOISE_PROCESS_KEYS = {"rescale_betas_zero_snr": False}


def schedule_scheduler(schedule: Schedule, sampling: SamplingInfo | None, source: str | Path | None = None):
    """The scheduler a schedule was calibrated with (its step count depends on it), else the build's.

    Refused when its noise process differs from the model's (a schedule from another model cannot run here), or
    when the schedule names timesteps this scheduler cannot sample at.
    """
    scheduler = _named_scheduler(schedule, sampling, source)
    if schedule.timesteps is not None:
        set_custom_timesteps(scheduler, schedule.timesteps, source)
    return scheduler


def _named_scheduler(schedule: Schedule, sampling: SamplingInfo | None, source: str | Path | None):
    """The schedule's own scheduler (same noise process as the model's), or the build's when it names none."""
    if schedule.scheduler is None:
        if sampling is None:
            raise TmpdiffError("the schedule names no scheduler and the build has no sampling info", source)
        return sampling_scheduler(sampling)
    scheduler = scheduler_from(schedule.scheduler.class_name, schedule.scheduler.config, source)
    if sampling is not None:
        check_noise_process(scheduler, sampling_scheduler(sampling).config, "the schedule's scheduler", "the model's",
                             source)
    return scheduler


def check_noise_process(scheduler, reference, what: str, whose: str, source: str | Path | None) -> None:
    """Refuse `scheduler` when a NOISE_PROCESS_KEYS value differs from the `reference` config's."""
    def value(config, key: str):
        return config.get(key, ABSENT_NOISE_PROCESS_KEYS.get(key))

    differing = [k for k in NOISE_PROCESS_KEYS if k in reference and value(reference, k) != value(scheduler.config, k)]
    if differing:
        key = differing[0]
        raise TmpdiffError(f"{what} has another noise process than {whose} ({key}: {value(scheduler.config, key)!r} "
                           f"vs {value(reference, key)!r})", source)


def plan_scheduler_for(schedule: Schedule, current, source: str | Path | None = None):
    """The scheduler a plan names, for a pipeline whose own scheduler is `current` (None when the plan names none, or
    the same class configured the same); refused when its noise process differs from the pipeline's. The same class
    with another spacing (DDIM 'trailing' rows on a 'linspace' DDIM pipeline) is the plan's."""
    if schedule.scheduler is None:
        return None
    scheduler = scheduler_from(schedule.scheduler.class_name, schedule.scheduler.config, source)
    check_noise_process(scheduler, current.config, "the plan's scheduler", "the pipeline's", source)
    same = type(scheduler) is type(current) and all(
        current.config.get(key) == value for key, value in scheduler.config.items() if not key.startswith("_"))
    return None if same else scheduler


def train_timesteps(scheduler) -> int:
    """How many training timesteps the scheduler has (diffusers' default 1000 when its config omits it)."""
    return int(scheduler.config.get("num_train_timesteps", 1000))


def takes_custom_timesteps(scheduler) -> bool:
    """Whether the scheduler's `set_timesteps` has a `timesteps=` argument (its config may still refuse them)."""
    return "timesteps" in inspect.signature(scheduler.set_timesteps).parameters


def shown_timesteps(values: Sequence[float], first: int = 6) -> str:
    """The first few of a list of timesteps for a message ("999, 749, 500, ...")."""
    values = [float(t) for t in values]
    return ", ".join(f"{t:g}" for t in values[:first]) + (", ..." if len(values) > first else "")


def set_custom_timesteps(scheduler, timesteps: Sequence[int], source: str | Path | None = None) -> None:
    """Set the scheduler to sample at exactly `timesteps`, or refuse in one line naming the source and the class.

    Refused when a timestep is outside 0..num_train_timesteps-1, when `set_timesteps` takes no `timesteps=` or
    raises for them (a config that forbids them), and when the scheduler would sample at other timesteps.
    """
    name = type(scheduler).__name__
    train = train_timesteps(scheduler)
    outside = [t for t in timesteps if not 0 <= t < train]
    if outside:
        raise TmpdiffError(f"timestep {outside[0]} is outside {name}'s training timesteps 0..{train - 1}", source)
    if not takes_custom_timesteps(scheduler):
        raise TmpdiffError(f"{name} cannot sample at custom timesteps (its set_timesteps takes no timesteps=); "
                           f"use e.g. DPMSolverMultistepScheduler, EulerDiscreteScheduler or DDPMScheduler", source)
    try:
        scheduler.set_timesteps(timesteps=list(timesteps))
    except (TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TmpdiffError(f"{name} cannot sample at custom timesteps ({reason})", source) from None
    ran = [float(t) for t in scheduler.timesteps]
    if ran != [float(t) for t in timesteps]:
        raise TmpdiffError(f"{name} does not sample at exactly the schedule's timesteps (it would run {len(ran)} "
                           f"steps at {shown_timesteps(ran)})", source)


def step_generator(scheduler, seed: int):
    """A CPU generator seeded with `seed` for `scheduler.step(..., generator=)`, or None where the step takes none.
    Stochastic steps (DDPM, Euler ancestral, SDE solvers) draw their noise from it, so a run is reproducible from its
    seed and two schedules judged on one seed see the same step noise; without it they draw from torch's global
    generator. Deterministic solvers ignore it."""
    import torch

    if "generator" not in inspect.signature(scheduler.step).parameters:
        return None
    return torch.Generator(device="cpu").manual_seed(int(seed))


def inference_steps_for(scheduler, calls: int) -> int:
    """The `num_inference_steps` at which `scheduler` makes `calls` denoiser calls (one per timestep): `calls` for most
    solvers, `calls - 1` for PNDM with `skip_prk_steps` (its first PLMS step calls the model twice at one timestep).
    Refused, naming the class, when no step count makes exactly that many calls (e.g. an even count for Heun)."""
    probe = type(scheduler).from_config(scheduler.config)  # a copy: the caller's scheduler keeps its state
    # dynamic shifting (FLUX.1-dev's flow-matching config) needs the pipeline's `mu` to set the steps; it moves the
    # timesteps, not their count, so any value counts the calls
    shift = {"mu": 0.0} if scheduler.config.get("use_dynamic_shifting") else {}
    made = []
    for steps in range(calls, 0, -1):  # calls never fall below the step count, and grow with it
        try:
            probe.set_timesteps(steps, **shift)
        except (ValueError, TypeError, IndexError):
            continue
        count = len(probe.timesteps)
        if count == calls:
            return steps
        made.append(f"{steps} -> {count}")
        if count < calls:
            break
    raise TmpdiffError(f"{type(scheduler).__name__} makes no step count of exactly {calls} denoiser calls "
                       f"(num_inference_steps -> calls: {', '.join(made[:3]) or 'none'}); a schedule has one precision "
                       "per call: use another step count")


def set_sampling_timesteps(scheduler, steps: int, timesteps: Sequence[int] | None = None) -> None:
    """Start a run of `steps` denoiser calls: the scheduler's own spacing (at the `inference_steps_for` them), or
    exactly `timesteps` when given."""
    if timesteps is None:
        scheduler.set_timesteps(steps)
        if len(scheduler.timesteps) != steps:
            scheduler.set_timesteps(inference_steps_for(scheduler, steps))
        return
    if len(timesteps) != steps:
        raise TmpdiffError(f"{len(timesteps)} timesteps for {steps} steps")
    set_custom_timesteps(scheduler, timesteps)


def check_step_count(scheduler, steps: int) -> None:
    """Refuse more steps than a schedule may have (MAX_STEPS) or than the scheduler has training timesteps."""
    if not 1 <= steps <= MAX_STEPS:
        raise TmpdiffError(f"{steps} steps: a run takes 1..{MAX_STEPS} (no scheduler has more training timesteps)")
    train = train_timesteps(scheduler)
    if steps > train:
        raise TmpdiffError(f"{steps} steps, but the scheduler has {train} training timesteps: use at most {train}")


def check_distinct_timesteps(scheduler, steps: int) -> None:
    """Refuse a step count (denoiser calls) the scheduler cannot give distinct timesteps for: fewer distinct timesteps
    than its inference steps means its spacing ran out of training timesteps and repeats one, and a model step at a
    repeated timestep divides by zero in multistep solvers. Repeats by design are not refused (PNDM's second call at
    its first timestep, Heun's two calls per timestep). With dynamic shifting the timesteps depend on the pipeline's
    `mu`: only the count is checked."""
    check_step_count(scheduler, steps)
    if scheduler.config.get("use_dynamic_shifting"):
        return
    set_sampling_timesteps(scheduler, steps)
    check_timestep_range(scheduler)
    distinct = len({float(t) for t in scheduler.timesteps})
    inference = inference_steps_for(scheduler, steps)
    if distinct < inference:
        raise TmpdiffError(f"{type(scheduler).__name__} repeats timesteps at {steps} steps ({distinct} distinct for "
                           f"{inference} inference steps): use fewer steps")
