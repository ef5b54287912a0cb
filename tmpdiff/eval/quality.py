"""Reference-free quality of generated digits: classifier accuracy and Fréchet distance in its feature space."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from scipy import linalg

from tmpdiff.eval.classifier import DigitClassifier, classify


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@cache
def _real_features(classifier_dir: str) -> np.ndarray:
    from tmpdiff.models.digits import load_digits_tensors

    classifier = DigitClassifier.load(classifier_dir)
    images, _ = load_digits_tensors()
    return classify(classifier, images)[1].numpy()


def sample_quality(classifier_dir: str, latents: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy of the classifier on samples (vs the class asked for) and FD to the real digits' features."""
    classifier = DigitClassifier.load(classifier_dir)
    preds, feats = classify(classifier, latents.cpu())
    return {"accuracy": float((preds == labels.cpu()).float().mean()),
            "fd": frechet_distance(feats.numpy(), _real_features(str(classifier_dir)))}
