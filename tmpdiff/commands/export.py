"""`tmpdiff export`: which model directory, and which calibration data its quantization gets."""

from __future__ import annotations

from pathlib import Path

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.models.bundled import INFO_NAME, bundled_dir, load_model_info, sampling_info


def resolve_model_dir(model: str, subfolder: str | None) -> Path:
    """The denoiser directory: `bundled` is the packaged model's transformer, else MODEL[/SUBFOLDER]."""
    root = bundled_dir() if model == "bundled" else Path(model)
    if model == "bundled" and subfolder is None:
        subfolder = "transformer"
    return root / subfolder if subfolder else root


def calibration_for(model_dir: Path, seeds: list[int], classes: list[int] | None):
    """Sampled trajectories (and sampling info) for a tmpdiff class-conditional model dir; (None, None) otherwise,
    where export falls back to random inputs."""
    root = model_dir.parent
    if not (root / INFO_NAME).is_file():
        return None, None
    from tmpdiff.runtime.capture import sampled_recipe

    info = load_model_info(root)
    sampling = sampling_info(info)
    chosen = list(range(info.num_classes)) if classes is None else classes
    bad = [c for c in chosen if not 0 <= c < info.num_classes]
    if bad:
        raise TmpdiffError(f"--calib-classes {bad} out of range 0..{info.num_classes - 1}")
    return sampled_recipe(sampling, chosen, seeds), sampling
