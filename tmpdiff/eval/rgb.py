"""Reference-based metrics of decoded RGB images: SSIM over all three channels and PSNR (scikit-image)."""

from __future__ import annotations

import numpy as np
import torch


def rgb_metrics(images: torch.Tensor, reference: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image SSIM (channels averaged, scikit-image's `channel_axis`) and PSNR (dB, inf where identical) of
    images (N, 3, H, W) in [0, 1] against their references."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    got = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float64)
    want = reference.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float64)
    ssims, psnrs = [], []
    for img, ref in zip(got, want, strict=True):
        ssims.append(structural_similarity(ref, img, data_range=1.0, channel_axis=-1))
        psnrs.append(peak_signal_noise_ratio(ref, img, data_range=1.0) if not np.array_equal(img, ref) else np.inf)
    return np.asarray(ssims), np.asarray(psnrs)


def mean_rgb_metrics(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean SSIM (RGB) and mean PSNR (`metrics.mean_psnr`: inf only if every image is identical to its reference)."""
    from tmpdiff.eval.metrics import mean_psnr

    ssims, psnrs = rgb_metrics(images, reference)
    return float(ssims.mean()), mean_psnr(psnrs)
