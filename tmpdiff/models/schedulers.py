"""Diffusers schedulers, built one way: a class name and a config (from a directory or a build's record)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tmpdiff.formats.atomic import read_json_object
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import SamplingInfo
from tmpdiff.formats.schedule import Schedule


def scheduler_from(class_name: str, config: dict[str, Any], source: str | Path | None = None):
    """A fresh diffusers scheduler of this class and config; unknown classes are a named error."""
    import diffusers

    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise TmpdiffError(f"unknown diffusers scheduler {class_name!r}", source)
    # a null value (schedule files written before non-finite numbers were kept) takes the class's default
    return cls.from_config({k: v for k, v in config.items() if v is not None})


def load_scheduler(scheduler_dir: str | Path):
    """A fresh scheduler from a `scheduler_config.json` directory (class taken from the config)."""
    config_path = Path(scheduler_dir) / "scheduler_config.json"
    if not config_path.is_file():
        raise TmpdiffError("no scheduler_config.json", scheduler_dir)
    config = read_json_object(config_path)
    return scheduler_from(config.get("_class_name"), config, config_path)


def sampling_scheduler(sampling: SamplingInfo):
    """A fresh scheduler of the class and config a build directory recorded for sampling."""
    return scheduler_from(sampling.scheduler_class, sampling.scheduler_config)


# Config keys that define the model's noise process (what it was trained on); a solver may differ, these may not.
NOISE_PROCESS_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas", "prediction_type",
                      "timestep_spacing", "rescale_betas_zero_snr")


def schedule_scheduler(schedule: Schedule, sampling: SamplingInfo | None, source: str | Path | None = None):
    """The scheduler a schedule was calibrated with (its step count depends on it), else the build's.

    Refused when its noise process differs from the model's: a schedule from another model cannot run here.
    """
    if schedule.scheduler is None:
        if sampling is None:
            raise TmpdiffError("the schedule names no scheduler and the build has no sampling info", source)
        return sampling_scheduler(sampling)
    scheduler = scheduler_from(schedule.scheduler.class_name, schedule.scheduler.config, source)
    if sampling is not None:
        model = sampling_scheduler(sampling).config
        differing = [k for k in NOISE_PROCESS_KEYS if k in model and model.get(k) != scheduler.config.get(k)]
        if differing:
            key = differing[0]
            raise TmpdiffError(f"the schedule's scheduler has another noise process than the model's ({key}: "
                               f"{scheduler.config.get(key)!r} vs {model.get(key)!r})", source)
    return scheduler


def check_distinct_timesteps(scheduler, steps: int) -> None:
    """Refuse a step count the scheduler cannot give distinct timesteps for (it would repeat one, and a model
    step at a repeated timestep divides by zero in multistep solvers)."""
    train = int(scheduler.config.get("num_train_timesteps", 1000))
    if steps > train:
        raise TmpdiffError(f"{steps} steps, but the scheduler has {train} training timesteps: use at most {train}")
    scheduler.set_timesteps(steps)
    distinct = len({float(t) for t in scheduler.timesteps})
    if distinct < len(scheduler.timesteps):
        raise TmpdiffError(f"{type(scheduler).__name__} repeats timesteps at {steps} steps ({distinct} distinct of "
                           f"{len(scheduler.timesteps)}): use fewer steps")
