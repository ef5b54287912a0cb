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


# scheduler config counts a diffusers scheduler takes on trust (a bad one fails deep inside numpy or at a step)
_SCHEDULER_COUNTS = {"num_train_timesteps": 1, "solver_order": 1}


def check_scheduler_counts(config: dict) -> dict:
    """`config` unchanged when its counts are integers of at least their least value; else a ValueError naming them."""
    for key, least in _SCHEDULER_COUNTS.items():
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"scheduler config {key} must be an integer >= {least}, got {value!r}")
    return config
