"""Maps diffusers class names to adapters."""

from __future__ import annotations

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


def adapter_for_config(config: dict) -> DenoiserAdapter:
    """The adapter for a diffusers model config (its `_class_name`); unknown classes name what is supported."""
    name = config.get("_class_name")
    if name not in ADAPTERS:
        raise TmpdiffError(f"unsupported architecture {name!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name](dict(config))
