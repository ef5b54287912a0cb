"""Maps diffusers class names to adapters."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.models.adapter import DenoiserAdapter
from tmpdiff.models.dit import DiTAdapter
from tmpdiff.models.flux import FluxAdapter
from tmpdiff.models.pixart import PixArtAdapter
from tmpdiff.models.sana import SanaAdapter
from tmpdiff.models.sd3 import SD3Adapter
from tmpdiff.models.unet import UNetAdapter

ADAPTERS: dict[str, type[DenoiserAdapter]] = {
    cls.architecture: cls for cls in (DiTAdapter, UNetAdapter, SD3Adapter, FluxAdapter, SanaAdapter, PixArtAdapter)
}


def adapter_for_config(config: dict, source: str | Path | None = None, options: Collection[str] = ()) -> DenoiserAdapter:
    """The adapter for a diffusers model config (its `_class_name`); unknown classes name what is supported, and a graph
    size no graph can take is refused naming where it came from: the option (`options`: the config keys an option
    such as --sample-size set) or the config file `source`."""
    name = config.get("_class_name")
    if name not in ADAPTERS:
        raise TmpdiffError(f"unsupported architecture {name!r}; supported: {', '.join(sorted(ADAPTERS))}")
    adapter = ADAPTERS[name](dict(config))
    problem = adapter.size_problem()
    if problem is not None:
        key, what = problem
        if key in options:
            raise TmpdiffError(f"--{key.replace('_', '-')} {config[key]}: {what}")
        raise TmpdiffError(f"{key} {what}", source)
    return adapter
