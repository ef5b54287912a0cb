"""Diffusers schedulers, built one way: a class name and a config (from a directory or a build's record)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tmpdiff.formats.atomic import read_json_object
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import SamplingInfo


def scheduler_from(class_name: str, config: dict[str, Any], source: str | Path | None = None):
    """A fresh diffusers scheduler of this class and config; unknown classes are a named error."""
    import diffusers

    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise TmpdiffError(f"unknown diffusers scheduler {class_name!r}", source)
    return cls.from_config(config)


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
