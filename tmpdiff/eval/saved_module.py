"""Small judging networks saved as config.json + model.safetensors (never pickled), each file written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, TypeVar

from torch import nn

from tmpdiff.formats.atomic import atomic_path, read_json_object, write_json
from tmpdiff.formats.errors import TmpdiffError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

Saved = TypeVar("Saved", bound="SavedModule")


class SavedModule(nn.Module):
    """A module rebuilt from `self.config` (its constructor's keyword arguments) and a safetensors state dict;
    subclasses name their `FORMAT`."""

    FORMAT: ClassVar[str]
    config: dict

    def save(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (each atomically)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        write_json(directory / CONFIG_NAME, {"format": self.FORMAT, **self.config})

    @classmethod
    def load(cls: type[Saved], directory: str | Path) -> Saved:
        """Load from a directory written by `save`; errors name the bad file."""
        from tmpdiff.models.loading import load_safetensors

        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise TmpdiffError("classifier config.json is missing", directory)
        config = read_json_object(config_path)
        if config.pop("format", None) != cls.FORMAT:
            raise TmpdiffError(f"not a {cls.FORMAT} classifier config", config_path)
        try:
            model = cls(**config)
        except TypeError as exc:
            raise TmpdiffError(f"classifier config does not fit {cls.__name__} ({exc})", config_path) from None
        state = load_safetensors(directory / WEIGHTS_NAME)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise TmpdiffError(f"weights do not match the config ({exc})", directory / WEIGHTS_NAME) from None
        return model.eval()
