"""The bundled text-to-image model's data: scikit-learn's digits rendered as a coloured digit on a coloured background.

Every image is one of 300 attribute combinations (digit x digit colour x background colour, the colours differ).
30 of them, one digit per ordered colour pair, are held out of all training so generalisation can be measured:
each held-out combination's digit, colour pair, digit-and-colour and digit-and-background were all seen in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from tmpdiff.formats.errors import TmpdiffError

IMAGE_SIZE = 32
NUM_DIGITS = 10
# Names and RGB values in [0, 1]; far apart in RGB so a colour is never a judgement call.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.20, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_PROMPT = re.compile(r"^\s*an?\s+(?P<fg>[a-z]+)\s+(?P<digit>\d)\s+on\s+an?\s+(?P<bg>[a-z]+)\s+background\s*\.?\s*$",
                     re.IGNORECASE)


@dataclass(frozen=True, order=True)
class Combo:
    """One attribute combination: a digit (0-9) in colour `fg` on background colour `bg` (indices into COLOUR_NAMES)."""

    digit: int
    fg: int
    bg: int

    @property
    def prompt(self) -> str:
        return f"a {COLOUR_NAMES[self.fg]} {self.digit} on a {COLOUR_NAMES[self.bg]} background"


def colour_pairs() -> list[tuple[int, int]]:
    """The 30 ordered (digit colour, background colour) pairs with different colours, in a fixed order."""
    n = len(COLOUR_NAMES)
    return [(fg, bg) for fg in range(n) for bg in range(n) if fg != bg]


def all_combos() -> list[Combo]:
    """All 300 combinations, sorted."""
    return sorted(Combo(d, fg, bg) for fg, bg in colour_pairs() for d in range(NUM_DIGITS))


def held_out_combos() -> list[Combo]:
    """The 30 combinations no model is trained on: for the p-th colour pair, digit (3p) mod 10 (each digit 3 times)."""
    return sorted(Combo((3 * p) % NUM_DIGITS, fg, bg) for p, (fg, bg) in enumerate(colour_pairs()))


def held_in_combos() -> list[Combo]:
    """The 270 training combinations."""
    held_out = set(held_out_combos())
    return [c for c in all_combos() if c not in held_out]


def parse_prompt(text: str) -> Combo:
    """'a red 3 on a blue background' -> Combo(3, red, blue); anything else is a TmpdiffError."""
    match = _PROMPT.match(text)
    if match is None:
        raise TmpdiffError(f"not a prompt of the form 'a <colour> <digit> on a <colour> background': {text!r}")
    fg, bg = match["fg"].lower(), match["bg"].lower()
    unknown = [c for c in (fg, bg) if c not in COLOURS]
    if unknown:
        raise TmpdiffError(f"unknown colour {unknown[0]!r} in {text!r}; known: {', '.join(COLOUR_NAMES)}")
    if fg == bg:
        raise TmpdiffError(f"the digit and background colours must differ: {text!r}")
    return Combo(int(match["digit"]), COLOUR_NAMES.index(fg), COLOUR_NAMES.index(bg))


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (torch.from_numpy(digits.images.astype(np.float32) / 16.0),
            torch.from_numpy(digits.target.astype(np.int64)))


def digit_masks(image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ink masks (N, 1, S, S) in [0, 1] (bilinear from 8x8) and their labels (N,)."""
    images, labels = _digits()
    masks = F.interpolate(images.unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=False)
    return masks.clamp(0.0, 1.0), labels.clone()


def digit_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, test) indices into the 1797 digits; test images judge the classifier only."""
    order = torch.randperm(len(_digits()[1]), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(order) * test_fraction))
    return order[n_test:].sort().values, order[:n_test].sort().values


def render(masks: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Ink masks (N, 1, S, S) and colour indices (N,) -> RGB images (N, 3, S, S) in [-1, 1]."""
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    ink, paper = palette[fg][:, :, None, None], palette[bg][:, :, None, None]
    return (paper * (1.0 - masks) + ink * masks) * 2.0 - 1.0


def examples_of(combos: list[Combo], labels: torch.Tensor, per_combo: int, seed: int,
                pool: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Combo]]:
    """`per_combo` digit-image indices (drawn from `pool`, default all) showing each combo's digit, and the combos."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(labels)) if pool is None else pool
    indices, out = [], []
    for combo in combos:
        candidates = pool[labels[pool] == combo.digit]
        indices.append(candidates[torch.randint(0, len(candidates), (per_combo,), generator=gen)])
        out += [combo] * per_combo
    return torch.cat(indices), out


def render_combos(combos: list[Combo], per_combo: int, seed: int, pool: torch.Tensor | None = None,
                  image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[Combo]]:
    """Ground-truth images (N, 3, S, S) in [-1, 1] for each combo (`per_combo` random digit images each)."""
    masks, labels = digit_masks(image_size)
    indices, expanded = examples_of(combos, labels, per_combo, seed, pool)
    fg = torch.tensor([c.fg for c in expanded], dtype=torch.int64)
    bg = torch.tensor([c.bg for c in expanded], dtype=torch.int64)
    return render(masks[indices], fg, bg), expanded


def attributes(combos: list[Combo]) -> torch.Tensor:
    """(N, 3) int64 (digit, fg, bg) of a list of combos."""
    return torch.tensor([[c.digit, c.fg, c.bg] for c in combos], dtype=torch.int64).reshape(-1, 3)
