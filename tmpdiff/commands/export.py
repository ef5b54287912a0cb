"""`tmpdiff export`: which model directory, and which calibration data its quantization gets."""

from __future__ import annotations

from pathlib import Path

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.models.bundled import INFO_NAME, bundled_dir, load_model_info, sampling_info

BUNDLED_T2I = "bundled-t2i"  # the bundled text-to-image pipeline's transformer
PIPELINE_DEFAULT_STEPS = 20  # calibration steps for a pipeline without --calib-steps


def resolve_model_dir(model: str, subfolder: str | None) -> Path:
    """The denoiser directory: `bundled` is the packaged class-conditional model's transformer, `bundled-t2i` the
    packaged text-to-image pipeline's, else MODEL[/SUBFOLDER]."""
    if model == BUNDLED_T2I:
        from tmpdiff.models.tiny_t2i import t2i_dir

        return t2i_dir() / (subfolder or "transformer")
    root = bundled_dir() if model == "bundled" else Path(model)
    if model == "bundled" and subfolder is None:
        subfolder = "transformer"
    if subfolder is None and (root / "model_index.json").is_file() and not (root / "config.json").is_file():
        from tmpdiff.runtime.pipeline_io import pipeline_denoiser_name

        raise TmpdiffError(f"a pipeline directory: pass --subfolder {pipeline_denoiser_name(root)} to export its "
                           "denoiser", root)
    return root / subfolder if subfolder else root


def model_root(model: str) -> Path:
    """The directory a MODEL argument names (`bundled`, `bundled-t2i`: the packaged ones): a command's input, which no
    output may land inside."""
    if model == BUNDLED_T2I:
        from tmpdiff.models.tiny_t2i import t2i_dir

        return t2i_dir()
    return bundled_dir() if model == "bundled" else Path(model)


def pipeline_of(model_dir: Path) -> Path | None:
    """The pipeline directory a denoiser directory is a component of (MODEL --subfolder transformer), if any."""
    root = model_dir.parent
    return root if (root / "model_index.json").is_file() else None


def _random_recipe(batches: int | None):
    from tmpdiff.export.calibration_data import random_recipe

    return random_recipe() if batches is None else random_recipe(batches=batches)


def calibration_for(model_dir: Path, seeds: list[int], classes: list[int] | None, *, prompts: Path | None = None,
                    steps: int | None = None, guidance: float | None = None, random: bool = False,
                    needed: bool = True, random_batches: int | None = None):
    """The calibration recipe (and sampling info) for a quantized export:
    - a tmpdiff class-conditional model dir: sampled trajectories of `classes` x `seeds`;
    - a pipeline's denoiser with `prompts`: its inputs captured from the stock pipeline over the prompts x `seeds`
      (with `classes` instead, for a pipeline that takes class labels such as DiTPipeline: over those labels);
    - `random`: random N(0, 1) inputs, only when asked for (`random_batches` batches of 2; default 8).
    `steps` and `guidance` set the sampled or captured runs (default: the model's sampling info, or 20 steps and the
    pipeline's guidance); with `random` there are none, and they are refused.
    Without any of them (and `needed`: some precision is quantized) a clear error says what to pass."""
    pipeline = pipeline_of(model_dir)
    if guidance is not None:
        from tmpdiff.runtime.capture import check_calibration_guidance

        check_calibration_guidance(guidance)
    run_options = " and ".join(n for n, v in (("--calib-steps", steps), ("--calib-guidance", guidance)) if v is not None)
    if random and run_options:
        raise TmpdiffError(f"--random-calibration samples no runs for {run_options} to set: give one or the other")
    if random_batches is not None and not random:
        raise TmpdiffError("--random-batches sets how many batches --random-calibration makes: give both, or neither")
    if prompts is not None and random:
        raise TmpdiffError("give --prompts or --random-calibration, not both")
    if classes is not None and (random or prompts is not None):
        raise TmpdiffError(f"give --calib-classes or {'--random-calibration' if random else '--prompts'}, not both")
    if prompts is not None and pipeline is None:
        raise TmpdiffError("--prompts captures inputs from a pipeline: give the pipeline directory with "
                           "--subfolder transformer (or unet)", model_dir)
    if (model_dir.parent / INFO_NAME).is_file():
        if prompts is not None:
            raise TmpdiffError("a class-conditional model is calibrated on its own sampled trajectories (--calib-seeds, "
                               "--calib-classes), not --prompts", model_dir.parent / INFO_NAME)
        info = load_model_info(model_dir.parent)
        sampling = sampling_info(info)
        if random:
            return _random_recipe(random_batches), sampling
        from tmpdiff.runtime.capture import sampled_recipe

        chosen = list(range(info.num_classes)) if classes is None else classes
        bad = [c for c in chosen if not 0 <= c < info.num_classes]
        if bad:
            raise TmpdiffError(f"--calib-classes {bad} out of range 0..{info.num_classes - 1}")
        return sampled_recipe(sampling, chosen, seeds, steps, guidance), sampling
    if random:
        return _random_recipe(random_batches), None
    if classes is not None and pipeline is None:
        raise TmpdiffError("--calib-classes names the class labels of a class-conditional model (a tmpdiff model "
                           f"directory with a {INFO_NAME}, or a pipeline that takes class labels: MODEL --subfolder "
                           "transformer)", model_dir)
    if prompts is not None or classes is not None:
        from tmpdiff.runtime.capture import PipelineCapture, prompted_recipe, read_prompts

        conditions = read_prompts(prompts) if prompts is not None else list(classes)
        capture = PipelineCapture(pipeline, conditions, list(seeds), steps or PIPELINE_DEFAULT_STEPS, guidance,
                                  prompts_file=None if prompts is None else str(prompts))
        return prompted_recipe(capture), None
    if not needed:
        if run_options:
            raise TmpdiffError(f"{run_options} set the runs calibration inputs are captured from (--prompts, or a "
                               "pipeline's --calib-classes): this export captures none")
        return None, None
    from tmpdiff.models.loading import read_model_config

    read_model_config(model_dir)  # not a model directory at all: that error first
    from tmpdiff.runtime.pipeline_io import pipeline_takes_class_labels

    if pipeline is not None and pipeline_takes_class_labels(pipeline):
        raise TmpdiffError(f"quantizing needs calibration data, and {pipeline} takes class labels, not prompts: pass "
                           "--calib-classes (e.g. 0,1,2,3) to capture the denoiser's inputs from the pipeline over those "
                           "labels, or --random-calibration for random inputs", model_dir)
    where = f"the pipeline {pipeline}" if pipeline is not None else "its pipeline (MODEL_DIR --subfolder transformer)"
    raise TmpdiffError(f"quantizing needs calibration data: pass --prompts FILE to capture the denoiser's inputs from "
                       f"{where}, or --random-calibration for random inputs", model_dir)

