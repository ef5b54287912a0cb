"""The bundled model's data: scikit-learn's handwritten digits (shipped inside the package), upsampled."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
IMAGE_SIZE = 16


def load_digits_tensors(image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, S, S) float32 in [-1, 1] and their labels (N,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0) * 2.0 - 1.0
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels


def train_test_split(
    images: torch.Tensor, labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic split into (train, test) pairs."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """Model-space samples in [-1, 1], (N, 1, H, W) -> uint8 images (N, H, W)."""
    pixels = ((samples.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return pixels.squeeze(1).to(torch.uint8).cpu().numpy()
