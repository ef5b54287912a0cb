"""A small CNN that reads a coloured digit's three attributes (digit, digit colour, background colour)."""

from __future__ import annotations

import torch
from torch import nn

from tmpdiff.eval.saved_module import SavedModule

FORMAT = "tmpdiff.attribute_classifier/1"


def ink_map(images: torch.Tensor, frame: int = 2) -> torch.Tensor:
    """Colour-free view of (N, 3, S, S) images: distance of each pixel from the background colour (the median of the
    outer `frame` pixels), scaled so the strongest ink is 1. (N, 1, S, S)."""
    border = torch.cat([images[..., :frame, :].flatten(2), images[..., -frame:, :].flatten(2),
                        images[..., frame:-frame, :frame].flatten(2), images[..., frame:-frame, -frame:].flatten(2)], dim=2)
    distance = (images - border.median(dim=2).values[..., None, None]).norm(dim=1, keepdim=True)
    return distance / distance.flatten(1).amax(dim=1).clamp_min(0.1)[:, None, None, None]


def _conv_stack(channels: int, width: int, image_size: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * width * (image_size // 8) ** 2, out),
    )


class AttributeClassifier(SavedModule):
    """Reads (N, 3, S, S) images in [-1, 1]: a digit branch on the colour-free `ink_map` (so a digit is read the same
    in every colour pair, held-out ones included) and a colour branch on RGB + ink; each ends in a linear bottleneck.

    `features` is both bottlenecks before their activation, `digit_dim + colour_dim` (32) numbers: full-rank enough
    for a Fréchet distance from a few hundred samples.
    """

    FORMAT = FORMAT

    def __init__(self, num_digits: int = 10, num_colours: int = 6, width: int = 16, digit_dim: int = 24,
                 colour_dim: int = 8, image_size: int = 32) -> None:
        super().__init__()
        self.config = {"num_digits": num_digits, "num_colours": num_colours, "width": width, "digit_dim": digit_dim,
                       "colour_dim": colour_dim, "image_size": image_size}
        self.digit_branch = _conv_stack(1, width, image_size, digit_dim)
        self.colour_branch = _conv_stack(4, width // 2, image_size, colour_dim)
        self.digit = nn.Linear(digit_dim, num_digits)
        self.fg = nn.Linear(colour_dim, num_colours)
        self.bg = nn.Linear(colour_dim, num_colours)

    @property
    def feature_dim(self) -> int:
        return self.config["digit_dim"] + self.config["colour_dim"]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        ink = ink_map(images)
        return torch.cat([self.digit_branch(ink), self.colour_branch(torch.cat([images, ink], dim=1))], dim=1)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (digit, digit colour, background colour) from bottleneck features."""
        digit, colour = torch.relu(features).split([self.config["digit_dim"], self.config["colour_dim"]], dim=1)
        return self.digit(digit), self.fg(colour), self.bg(colour)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(self.features(images))


@torch.no_grad()
def read_attributes(model: AttributeClassifier, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted (digit, fg, bg) as (N, 3) int64 and bottleneck features (N, feature_dim) for images in [-1, 1]."""

    preds, feats = [], []
    for chunk in images.split(batch):
        f = model.features(chunk.float().clamp(-1, 1))
        feats.append(f)
        preds.append(torch.stack([logits.argmax(dim=1) for logits in model.heads(f)], dim=1))
    return torch.cat(preds), torch.cat(feats)
