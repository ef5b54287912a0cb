"""Reference-based image metrics: SSIM and PSNR from scikit-image, on samples decoded to [0, 1]."""

from __future__ import annotations

import numpy as np
import torch


def to_images(latents: torch.Tensor) -> np.ndarray:
    """Pixel-space samples in [-1, 1] -> float images in [0, 1], (N, H, W) (channel 0)."""
    return ((latents.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0)[:, 0].numpy()


def image_metrics(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean SSIM and PSNR of images against reference images, both in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ssims, psnrs = [], []
    for img, ref in zip(images, reference, strict=True):
        ssims.append(structural_similarity(ref, img, data_range=1.0))
        psnrs.append(peak_signal_noise_ratio(ref, img, data_range=1.0) if not np.array_equal(img, ref) else np.inf)
    return float(np.mean(ssims)), float(np.mean(psnrs))
