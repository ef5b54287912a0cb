"""The bundled model: a tiny class-conditional DiT trained on scikit-learn's digits."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tmpdiff.formats.atomic import read_json_object
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import SamplingInfo
from tmpdiff.models.digits import IMAGE_SIZE, NUM_CLASSES

BUNDLED_NAME = "tiny-dit"
INFO_NAME = "tmpdiff_model.json"

DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": 3,
    "attention_head_dim": 64,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 4,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,
}

# Trained with this noise schedule; sampled with DPM-Solver++ from the same betas.
TRAIN_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
}
# DPM-Solver++ predicts x0 = (x - sigma * eps) / alpha; at t = 999 of the cosine schedule alpha is
# ~5e-5, so a 1e-6 error in eps moves x0 by ~0.02 and the trajectory drifts. Pixel-space data live
# in [-1, 1]: thresholding clips x0 there (static clip, as sample_max_value = 1) and bounds that.
SAMPLING_SCHEDULER_OVERRIDES: dict[str, Any] = {"thresholding": True, "sample_max_value": 1.0}
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.0


def bundled_dir() -> Path:
    """Directory of the bundled model inside the installed package."""
    return Path(str(resources.files("tmpdiff") / "assets" / BUNDLED_NAME))


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a class-conditional pixel-space model."""

    root: Path
    num_classes: int
    image_size: int
    default_steps: int
    guidance_scale: float
    extra: dict[str, Any]

    @property
    def transformer_dir(self) -> Path:
        return self.root / "transformer"

    @property
    def scheduler_dir(self) -> Path:
        return self.root / "scheduler"

    @property
    def classifier_dir(self) -> Path:
        return self.root / "classifier"


def load_model_info(root: str | Path | None = None) -> ModelInfo:
    """Read `tmpdiff_model.json` of a bundled-style model directory (default: the bundled model)."""
    root = bundled_dir() if root is None or str(root) == "bundled" else Path(root)
    info_path = root / INFO_NAME
    if not root.is_dir():
        raise TmpdiffError("model directory does not exist", root)
    if not info_path.is_file():
        raise TmpdiffError(f"no {INFO_NAME}: not a tmpdiff class-conditional model directory", root)
    info = read_json_object(info_path)
    try:
        return ModelInfo(
            root=root,
            num_classes=int(info["num_classes"]),
            image_size=int(info["image_size"]),
            default_steps=int(info["default_steps"]),
            guidance_scale=float(info["guidance_scale"]),
            extra=info,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TmpdiffError(f"malformed model info ({exc!r})", info_path) from None


def sampling_info(info: ModelInfo) -> SamplingInfo:
    """The manifest's SamplingInfo for a tmpdiff class-conditional model directory."""
    from tmpdiff.models.schedulers import load_scheduler

    scheduler = load_scheduler(info.scheduler_dir)
    return SamplingInfo(
        scheduler_class=type(scheduler).__name__,
        # diffusers bookkeeping ("_use_default_values" comes from a set: its order differs per process) is left out
        scheduler_config={k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        num_classes=info.num_classes, null_class=int(info.extra.get("null_class", info.num_classes)),
        image_size=info.image_size, channels=int(info.extra.get("channels", 1)), default_steps=info.default_steps,
        guidance_scale=info.guidance_scale,
    )
