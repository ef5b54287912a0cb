"""The training script still runs end to end (a few iterations) and writes a loadable model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tmpdiff.eval.classifier import DigitClassifier
from tmpdiff.models.bundled import load_model_info
from tmpdiff.models.loading import load_diffusers_model
from tmpdiff.models.schedulers import load_scheduler

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny.py"


def test_train_tiny_few_iterations(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "model"
    assert module.main(["--out", str(out), "--steps", "3", "--classifier-steps", "3", "--eval-per-class", "1"]) == 0
    info = load_model_info(out)
    assert info.num_classes == 10 and info.default_steps == 20
    assert json.loads((out / "tmpdiff_model.json").read_text())["training"]["steps"] == 3
    assert type(load_diffusers_model(info.transformer_dir)).__name__ == "DiTTransformer2DModel"
    assert load_scheduler(info.scheduler_dir).config.thresholding
    DigitClassifier.load(info.classifier_dir)
