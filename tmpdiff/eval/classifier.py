"""A small CNN digit classifier that judges generated samples (accuracy, feature statistics)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tmpdiff.formats.atomic import atomic_path, read_json_object, write_json
from tmpdiff.formats.errors import TmpdiffError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "tmpdiff.classifier/1"


class DigitClassifier(nn.Module):
    """Conv-conv-MLP on (N, 1, 16, 16) images in [-1, 1]; `features` is the penultimate layer."""

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

    def save(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (each atomically)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        write_json(directory / CONFIG_NAME, {"format": FORMAT, **self.config})

    @classmethod
    def load(cls, directory: str | Path) -> DigitClassifier:
        """Load from a directory written by `save`; errors name the bad file."""
        from tmpdiff.models.loading import load_safetensors

        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise TmpdiffError("classifier config.json is missing", directory)
        config = read_json_object(config_path)
        if config.pop("format", None) != FORMAT:
            raise TmpdiffError(f"not a {FORMAT} classifier config", config_path)
        model = cls(**config)
        state = load_safetensors(directory / WEIGHTS_NAME)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise TmpdiffError(f"weights do not match the config ({exc})", directory / WEIGHTS_NAME) from None
        return model.eval()


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels and penultimate features for (N, 1, 16, 16) images in [-1, 1]."""
    preds, feats = [], []
    for chunk in images.split(batch):
        f = model.features(chunk.float().clamp(-1, 1))
        feats.append(f)
        preds.append(model.head(f).argmax(dim=1))
    return torch.cat(preds), torch.cat(feats)
