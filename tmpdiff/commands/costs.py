"""`tmpdiff costs`: a costs table stated for a target device (per-precision ratios and their source), not measured."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from tmpdiff.formats.costs import CostsTable, save_costs
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.outputs import Output, check_outputs
from tmpdiff.formats.precisions import get_precision


def _ratio(item: str) -> tuple[str, float]:
    """One PRECISION=RATIO pair; every problem is a one-line error naming the pair."""
    name, sep, text = (part.strip() for part in item.partition("="))
    if not sep or not name or not text:
        raise TmpdiffError(f"--ratio takes PRECISION=RATIO pairs separated by commas, got {item.strip()!r}")
    try:
        get_precision(name)
    except TmpdiffError as exc:
        raise TmpdiffError(f"--ratio: {exc}") from None
    try:
        ratio = float(text)
    except ValueError:
        raise TmpdiffError(f"--ratio {name}: {text!r} is not a number") from None
    if not math.isfinite(ratio) or ratio <= 0:
        raise TmpdiffError(f"--ratio {name}: the ratio must be a finite number above 0, got {text}")
    return name, ratio


def parse_ratios(texts: Iterable[str]) -> dict[str, float]:
    """`fp16=1,fp8=0.55` (one or more options) as {precision: ratio}; a precision given twice is refused."""
    ratios: dict[str, float] = {}
    for text in texts:
        if any(not item.strip() for item in text.split(",")):  # "fp16=1,,fp8=0.5": a pair lost to a typo?
            raise TmpdiffError(f"--ratio {text!r} has an empty pair: give PRECISION=RATIO pairs separated by single "
                               "commas")
    for item in (item for text in texts for item in text.split(",")):
        name, ratio = _ratio(item)
        if name in ratios:
            raise TmpdiffError(f"--ratio gives {name} twice")
        ratios[name] = ratio
    if len(ratios) < 2:
        raise TmpdiffError(f"--ratio gives {len(ratios) or 'no'} precision{'' if ratios else 's'}: give at least two "
                           "PRECISION=RATIO pairs to compare, e.g. fp16=1,fp8=0.55")
    return ratios


def _text(value: str, option: str, what: str) -> str:
    """A required free-text option on one line (runs of blanks and line breaks become one space); empty is refused."""
    text = " ".join(value.split())
    if not text:
        raise TmpdiffError(f"{option} is empty: name {what}")
    return text


def write_stated_costs(device: str, ratios: Iterable[str], source: str, out: Path, *, model_id: str | None = None,
                       force: bool = False) -> tuple[CostsTable, Path]:
    """Check the inputs and the output, then write the stated table atomically; returns it and the path written."""
    from pydantic import ValidationError

    from tmpdiff.formats.atomic import validation_problems

    try:
        table = CostsTable.stated(_text(device, "--device", "the device the ratios are for"), parse_ratios(ratios),
                                  _text(source, "--source", "where the ratios come from"),
                                  None if model_id is None else _text(model_id, "--model-id", "the model they are for"))
    except ValidationError as exc:  # e.g. ratios 1e308 and 1e-308: each finite, together unusable
        raise TmpdiffError(f"--ratio: {validation_problems(exc)}") from None
    path = check_outputs([Output.file("--out", out, ".json")], force=force)["--out"]
    save_costs(table, path)
    return table, path
