"""Every per-sample judgement of a batch of samples against the reference schedule's samples of the same inputs."""

from __future__ import annotations

import numpy as np
import torch

from tmpdiff.eval.metrics import PSNR_CAP_DB, latent_errors, per_sample_metrics, to_images

# per-sample metrics, and whether lower is better for each
LOWER_IS_BETTER = {"latent": True, "one_minus_ssim": True, "psnr": False, "correct": False, "log_prob": False}


def judge(latents: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor,
          classifier_dir: str | None) -> dict[str, np.ndarray]:
    """Per sample: relative latent error, 1 - SSIM, PSNR (capped), and with a classifier correctness, log p(asked
    class) and its low-dimensional features (key `features`, shape (N, d))."""
    ssim, psnr = per_sample_metrics(to_images(latents), to_images(reference))
    out = {"latent": latent_errors(latents, reference), "one_minus_ssim": 1.0 - ssim,
           "psnr": np.minimum(psnr, PSNR_CAP_DB)}
    if classifier_dir is not None:
        from tmpdiff.eval.quality import per_sample_quality

        per = per_sample_quality(classifier_dir, latents, labels)
        out |= {"correct": per.correct, "log_prob": per.log_prob, "features": per.features}
    return out
