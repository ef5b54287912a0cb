"""A small CNN digit classifier that judges generated samples (accuracy, feature statistics)."""

from __future__ import annotations

import torch
from torch import nn

from tmpdiff.eval.saved_module import SavedModule

FORMAT = "tmpdiff.classifier/1"


class DigitClassifier(SavedModule):
    """Conv-conv-MLP on (N, 1, 16, 16) images in [-1, 1]; `features` is the penultimate layer."""

    FORMAT = FORMAT

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels and penultimate features for (N, 1, 16, 16) images in [-1, 1]."""

    preds, feats = [], []
    for chunk in images.split(batch):
        f = model.features(chunk.float().clamp(-1, 1))
        feats.append(f)
        preds.append(model.head(f).argmax(dim=1))
    return torch.cat(preds), torch.cat(feats)
