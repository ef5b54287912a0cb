"""Diffusers configs in standard JSON: non-finite numbers (e.g. a scheduler's lambda_min_clipped = -inf) are written
as the strings "inf", "-inf", "nan" and read back as floats; standard JSON has no Infinity or NaN."""

from __future__ import annotations

import math
from typing import Any

NON_FINITE = ("inf", "-inf", "nan")


def encode_non_finite(config: dict[str, Any]) -> dict[str, Any]:
    return {k: repr(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in config.items()}


def decode_non_finite(config: dict[str, Any]) -> dict[str, Any]:
    return {k: float(v) if isinstance(v, str) and v in NON_FINITE else v for k, v in config.items()}
