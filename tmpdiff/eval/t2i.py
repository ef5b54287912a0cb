"""Text-to-image evaluation on coloured digits: prompt adherence and a Fréchet distance in the classifier's features."""

from __future__ import annotations

import numpy as np
import torch

from tmpdiff.eval.attributes import AttributeClassifier, read_attributes
from tmpdiff.eval.quality import LOW_DIM, frechet_distance
from tmpdiff.models.colored_digits import Combo, attributes


def judge(classifier: AttributeClassifier, images: torch.Tensor, combos: list[Combo]) -> dict[str, float]:
    """Prompt adherence (all three attributes right) and each attribute's accuracy, for images asked as `combos`."""
    preds, _ = read_attributes(classifier, images)
    right = preds == attributes(combos)
    return {"adherence": float(right.all(dim=1).float().mean()), "digit": float(right[:, 0].float().mean()),
            "fg": float(right[:, 1].float().mean()), "bg": float(right[:, 2].float().mean()), "n": len(combos)}


def attribute_fd(classifier: AttributeClassifier, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between the classifier's bottleneck features of `images` and of `reference` images (all 32
    dimensions: for a few hundred images, as the model's training report has; tens of images take `LowAttributes`)."""
    feats = [read_attributes(classifier, x)[1].double().numpy() for x in (images, reference)]
    return frechet_distance(*feats)


class LowAttributes:
    """The classifier's features projected onto the top `LOW_DIM` principal directions of ground-truth renders' features
    (every digit x colour pair, `PER_COMBO` each): a Fréchet distance between tens of images (a bench's 16 calibration
    or 60 unseen samples) is estimated in 8 dimensions, where 32 leave its covariances singular or nearly so. The DiT's
    `fd_low` does the same with the real digits."""

    PER_COMBO = 4

    def __init__(self, classifier: AttributeClassifier) -> None:
        from tmpdiff.models.colored_digits import all_combos, render_combos

        self.classifier = classifier
        real = read_attributes(classifier, render_combos(all_combos(), self.PER_COMBO, seed=0)[0])[1].double().numpy()
        self.mean = real.mean(0)
        self.basis = np.linalg.svd(real - self.mean, full_matrices=False)[2][:LOW_DIM].T

    def features(self, images: torch.Tensor) -> np.ndarray:
        """(N, LOW_DIM) projected features of images in [-1, 1]."""
        return self.project(read_attributes(self.classifier, images)[1].double().numpy())

    def project(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) @ self.basis

    def fd(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        return frechet_distance(self.features(images), self.features(reference))


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, max_sequence_length: int,
             batch: int = 150) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] from a diffusers text-to-image pipeline, `batch` prompts per call.

    Call i draws its noise from a generator seeded `seed + i`, so a result depends only on the seed and the batching.
    """
    # no aspect-ratio bins (PixArt's need sample_size 32+) and no caption cleaning (it wants bs4/ftfy; prompts are plain)
    kwargs = {k: False for k in ("use_resolution_binning", "clean_caption") if k in _parameters(pipe)}
    out = []
    for i, start in enumerate(range(0, len(prompts), batch)):
        images = pipe(prompts[start : start + batch], num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(seed + i), output_type="pt",
                      max_sequence_length=max_sequence_length, **kwargs).images
        out.append(images.float().cpu() * 2.0 - 1.0)
    return torch.cat(out)


def _parameters(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
