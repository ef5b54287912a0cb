"""Reference-based image metrics: SSIM and PSNR from scikit-image, on samples decoded to [0, 1]."""

from __future__ import annotations

import numpy as np
import torch

PSNR_CAP_DB = 100.0  # per-sample PSNR of an image identical to its reference (inf) counts as this in means


def to_images(latents: torch.Tensor) -> np.ndarray:
    """Pixel-space samples in [-1, 1] -> float images in [0, 1], (N, H, W) (channel 0)."""
    return ((latents.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0)[:, 0].numpy()


def per_sample_metrics(images: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SSIM and PSNR (dB, inf where identical) of each image against its reference, both in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ssims, psnrs = [], []
    for img, ref in zip(images, reference, strict=True):
        ssims.append(structural_similarity(ref, img, data_range=1.0))
        psnrs.append(peak_signal_noise_ratio(ref, img, data_range=1.0) if not np.array_equal(img, ref) else np.inf)
    return np.asarray(ssims, dtype=np.float64), np.asarray(psnrs, dtype=np.float64)


def mean_psnr(psnrs: np.ndarray) -> float:
    """Mean PSNR with each image identical to its reference counted as PSNR_CAP_DB; inf only when every one is."""
    psnrs = np.asarray(psnrs, dtype=np.float64)
    if np.isinf(psnrs).all():
        return float("inf")
    return float(np.minimum(psnrs, PSNR_CAP_DB).mean())


def image_metrics(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean SSIM and PSNR (`mean_psnr`) of images against reference images, both in [0, 1]."""
    ssims, psnrs = per_sample_metrics(images, reference)
    return float(np.mean(ssims)), mean_psnr(psnrs)


def latent_errors(latents: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Per-sample relative squared distance ||x - x_ref||^2 / ||x_ref||^2."""
    diff = (latents - reference).flatten(1).pow(2).sum(1)
    norm = reference.flatten(1).pow(2).sum(1).clamp_min(1e-12)
    return (diff / norm).double().cpu().numpy()
