"""The committed model: files, size, classifier, and the generated-sample quality bar."""

from __future__ import annotations

import pytest
import torch

from tmpdiff.engines.ort import OrtEngine
from tmpdiff.eval.classifier import DigitClassifier, classify
from tmpdiff.models.bundled import bundled_dir
from tmpdiff.models.digits import load_digits_tensors, train_test_split
from tmpdiff.models.schedulers import load_scheduler
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise


def test_assets_are_small_and_safetensors_only():
    files = [p for p in bundled_dir().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]


def test_classifier_recognises_held_out_digits(bundled):
    classifier = DigitClassifier.load(bundled.classifier_dir)
    images, labels = load_digits_tensors()
    _, (test_x, test_y) = train_test_split(images, labels, seed=bundled.extra["training"]["seed"])
    preds, feats = classify(classifier, test_x)
    assert (preds == test_y).float().mean() >= 0.95
    assert feats.shape == (len(test_y), 128)


@pytest.mark.slow
def test_generated_samples_meet_quality_bar(fp32_build, bundled):
    """200 samples (20 per class), fp32 on ORT through the shipped runner, default steps: the classifier recognises >= 90%
    (a binomial standard error of about 2 points at the bundled model's accuracy)."""
    runner = ScheduledRunner({"fp32": OrtEngine(fp32_build / "fp32/model.onnx")}, 100, 1, bundled.image_size,
                             bundled.guidance_scale, bundled.num_classes, bundled.num_classes)
    classifier = DigitClassifier.load(bundled.classifier_dir)
    correct = 0
    labels_all = torch.arange(bundled.num_classes).repeat_interleave(20)
    for start in range(0, 200, 100):
        labels = labels_all[start : start + 100]
        noise = initial_noise(len(labels), 1, bundled.image_size, seed=10_000 + start)
        out = runner.sample(load_scheduler(bundled.scheduler_dir), labels, noise, ["fp32"] * bundled.default_steps)
        correct += int((classify(classifier, out.latents)[0] == labels).sum())
    print(f"bundled model, fp32 on ORT: {correct} of 200 samples recognised")
    assert correct / 200 >= 0.90, f"accuracy {correct / 200:.3f}"
