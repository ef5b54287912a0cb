"""Loading diffusers-format model directories with checks that name the bad path.

Only safetensors weights are ever read: a directory that holds pickle checkpoints
(`.bin`, `.pt`, `.ckpt`, `.pth`) is refused, never unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tmpdiff.formats.atomic import read_json_object
from tmpdiff.formats.errors import TmpdiffError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# diffusers' name for a variant checkpoint (`save_pretrained(variant="fp16")`): one file, or shards whose index is
# diffusion_pytorch_model.safetensors.index.fp16.json; a transformers model's (a pipeline's text encoder) is
# model.fp16.safetensors, or its shards
_VARIANT_FILE = re.compile(
    r"^(?:diffusion_pytorch_model|model)\.(?P<variant>[A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.safetensors$")


def variant_of(name: str) -> str | None:
    """The variant a safetensors file name carries (None: plain weights or another name)."""
    match = _VARIANT_FILE.match(name)
    return match["variant"] if match else None


def weights_variant(model_dir: Path) -> str | None:
    """The checkpoint variant diffusers must be asked for (`from_pretrained(variant=...)`): None when the directory
    holds plain weights (what diffusers loads without one, whatever variants lie beside them), else the one variant
    its safetensors files carry (`diffusion_pytorch_model.fp16.safetensors`, a transformers model's
    `model.fp16.safetensors`, or their shards). Several variants and no plain weights are refused: which one to load
    is not tmpdiff's guess."""
    names = [path.name for path in model_dir.glob("*.safetensors")]
    found = {variant_of(name) for name in names}
    if not names or None in found:
        return None
    variants = sorted(found)
    if len(variants) > 1:
        raise TmpdiffError(f"holds only variant checkpoints of several kinds ({', '.join(variants)}) and no plain "
                           "weights (diffusion_pytorch_model.safetensors or model.safetensors): keep the one variant to "
                           "load", model_dir)
    return variants[0]


def loaded_safetensors(model_dir: Path) -> list[Path]:
    """The safetensors files `load_diffusers_model` loads (the plain weights, or the one variant's): what the
    memory plan and the weight check read. Empty when there are none."""
    variant = weights_variant(model_dir)
    return [path for path in sorted(model_dir.glob("*.safetensors")) if variant_of(path.name) == variant]


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file is a TmpdiffError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TmpdiffError("weights file is missing", path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TmpdiffError(f"corrupt safetensors file ({exc})", path) from None


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The diffusers config.json of a model directory, checked for `_class_name`."""
    if not model_dir.exists():
        raise TmpdiffError("model directory does not exist", model_dir)
    if not model_dir.is_dir():
        raise TmpdiffError("not a directory", model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise TmpdiffError("not a diffusers model directory (no config.json)", model_dir)
    config = read_json_object(config_path)
    if "_class_name" not in config:
        raise TmpdiffError("not a diffusers model config (no _class_name)", config_path)
    return config


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors weight files a model directory's model is loaded from (`loaded_safetensors`); refuses
    pickle-only directories."""
    safetensors = loaded_safetensors(model_dir)
    if safetensors:
        return safetensors
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise TmpdiffError(
            f"holds only pickle checkpoints ({', '.join(pickles)}); tmpdiff loads safetensors only "
            "and never unpickles files: convert the weights to safetensors first",
            model_dir,
        )
    raise TmpdiffError("no .safetensors weights found", model_dir)


def check_weights(model_dir: Path) -> None:
    """Read every tensor of every safetensors file, one at a time, so corruption is caught before diffusers sees it
    without holding a second copy of a multi-gigabyte model."""
    from safetensors import SafetensorError, safe_open

    for path in weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise TmpdiffError(f"corrupt safetensors file ({exc})", path) from None


def load_diffusers_model(model_dir: str | Path, subfolder: str | None = None,
                         dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a diffusers model class from a local directory via `from_pretrained` (safetensors only), in `dtype`
    (default: as stored); a directory holding only a variant checkpoint (`*.fp16.safetensors`) loads that variant."""
    import diffusers

    model_dir = Path(model_dir)
    target = model_dir / subfolder if subfolder else model_dir
    config = read_model_config(target)
    class_name = config["_class_name"]
    model_cls = getattr(diffusers, class_name, None)
    if model_cls is None or not isinstance(model_cls, type) or not issubclass(model_cls, diffusers.ModelMixin):
        raise TmpdiffError(f"unknown diffusers model class {class_name!r}", target / "config.json")
    check_weights(target)
    variant = weights_variant(target)
    try:
        model = model_cls.from_pretrained(str(target), use_safetensors=True, local_files_only=True,
                                          **({"torch_dtype": dtype} if dtype is not None else {}),
                                          **({"variant": variant} if variant is not None else {}))
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TmpdiffError(f"could not load {class_name} ({first_line})", target) from None
    return model.eval()
