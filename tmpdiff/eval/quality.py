"""Reference-free quality of generated digits: classifier accuracy and confidence, Fréchet distances.

The classifier's penultimate features are 128-dimensional; a Fréchet distance needs well over 128 samples
for a full-rank covariance. `fd_low` projects the features onto the top principal directions of the real
digits' features (`LOW_DIM`, fitted on all 1,797 real digits) so that tens of samples estimate it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from scipy import linalg

from tmpdiff.eval.classifier import DigitClassifier, classify

LOW_DIM = 8


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples); 0 for a set and itself (the
    matrix square root's rounding gave +-3e-8 there), and never below 0."""
    if len(a) < 2 or len(b) < 2:  # no covariance: scipy's sqrtm would fail with an internal error
        raise ValueError(f"a Fréchet distance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if a.shape == b.shape and np.array_equal(a, b):
        return 0.0
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b).real  # (`disp=False`, for its error estimate, goes in SciPy 1.18)
    return max(0.0, float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean)))


@cache
def _real_features(classifier_dir: str) -> np.ndarray:
    from tmpdiff.models.digits import load_digits_tensors

    classifier = DigitClassifier.load(classifier_dir)
    images, _ = load_digits_tensors()
    return classify(classifier, images)[1].numpy()


@cache
def _projection(classifier_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-LOW_DIM principal directions of the real digits' features."""
    real = _real_features(classifier_dir)
    mean = real.mean(0)
    _, _, vt = np.linalg.svd(real - mean, full_matrices=False)
    return mean, vt[:LOW_DIM].T


def low_features(classifier_dir: str, features: np.ndarray) -> np.ndarray:
    """Features projected onto the real digits' top principal directions."""
    mean, basis = _projection(str(classifier_dir))
    return (features - mean) @ basis


def real_low_features(classifier_dir: str) -> np.ndarray:
    return low_features(classifier_dir, _real_features(str(classifier_dir)))


@dataclass
class PerSample:
    """Per-sample classifier judgements: correct (0/1), log-probability of the asked class, low-dim features."""

    correct: np.ndarray
    log_prob: np.ndarray
    features: np.ndarray


@cache
def _classifier(classifier_dir: str) -> DigitClassifier:
    return DigitClassifier.load(classifier_dir)


@torch.no_grad()
def per_sample_quality(classifier_dir: str, latents: torch.Tensor, labels: torch.Tensor) -> PerSample:
    """Correctness, log p(asked class) and `LOW_DIM` features of each sample."""
    classifier = _classifier(str(classifier_dir))
    images = latents.detach().float().cpu().clamp(-1, 1)
    feats = classifier.features(images)
    log_probs = torch.log_softmax(classifier.head(feats), dim=1)
    asked = labels.cpu().long()
    return PerSample(correct=(log_probs.argmax(1) == asked).double().numpy(),
                     log_prob=log_probs.gather(1, asked[:, None])[:, 0].double().numpy(),
                     features=low_features(str(classifier_dir), feats.numpy()))


def sample_quality(classifier_dir: str, latents: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, mean log p(asked class) and the FD to the real digits' features in `LOW_DIM` dimensions (the
    128-d FD is not reported: tens of samples leave its covariance singular)."""
    per = per_sample_quality(classifier_dir, latents, labels)
    return {"accuracy": float(per.correct.mean()), "log_prob": float(per.log_prob.mean()),
            "fd_low": frechet_distance(per.features, real_low_features(classifier_dir))}
