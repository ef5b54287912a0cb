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


# scheduler config counts a diffusers scheduler takes on trust (a bad one fails deep inside numpy or at a step):
# their least and greatest values (None: no cap). num_train_timesteps is capped because diffusers builds its beta
# table in a Python loop of that length when the scheduler is made: 10**10 took minutes and ended in a MemoryError;
# models train on 1000 (a few on up to 4000), so 100,000 leaves room and makes a scheduler in well under a second.
# solver_order sizes the multistep solvers' history list when the scheduler is made (10**9 is 8 GB of it); an order
# above the step count is never used, so the cap is a run's most steps (schedule.MAX_STEPS).
MAX_TRAIN_TIMESTEPS = 100_000
MAX_SOLVER_ORDER = 10_000
_SCHEDULER_COUNTS = {"num_train_timesteps": (1, MAX_TRAIN_TIMESTEPS), "solver_order": (1, MAX_SOLVER_ORDER)}


def check_scheduler_counts(config: dict) -> dict:
    """`config` unchanged when its counts are integers within their range; else a ValueError naming them."""
    for key, (least, most) in _SCHEDULER_COUNTS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"scheduler config {key} must be an integer >= {least}, got {value!r}")
        if most is not None and value > most:
            raise ValueError(f"scheduler config {key} must be at most {most:,}, got {value:,}")
    return config
