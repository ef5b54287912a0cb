"""Per-step sensitivities with adaptive sampling along t.

d_t(p): error of the reference schedule with step t alone lowered to p. u_t(p): error removed from the
all-cheapest schedule by raising step t alone to p. Both are sampled adaptively: the two ends first,
then an interval's midpoint; if it lies within `tolerance` (relative to the largest value seen) of the
line through the interval's ends the interval is interpolated, else both halves are refined. A measurement that is
not finite (a level whose output overflowed there: `search.Problem.error` gives +inf) is never interpolated across:
an interval with a non-finite end or midpoint is always split, so its neighbours are measured, not extrapolated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SensitivityCurve:
    """A sampled-and-interpolated curve over steps 0..T-1 and which steps were really evaluated."""

    values: np.ndarray
    sampled: list[int] = field(default_factory=list)


def first_points(steps: int) -> list[int]:
    """The steps every adaptive curve measures: both ends and, from 3 steps on, the middle."""
    return sorted({0, steps - 1} | ({(steps - 1) // 2} if steps > 2 else set()))


def adaptive_curve(steps: int, measure: Callable[[int], float], tolerance: float,
                   prefetch: Callable[[list[int]], None] = lambda _: None) -> SensitivityCurve:
    """Measure `measure(t)` at few t and interpolate the rest (at most `steps` evaluations).

    `prefetch` is told, before each measurement, every step the curve is now certain to measure (the midpoints of
    all intervals still to split: each is measured when its interval is popped), so they can run side by side."""
    known: dict[int, float] = {}

    def get(t: int) -> float:
        if t not in known:
            known[t] = measure(t)
        return known[t]

    get(0)
    if steps > 1:
        get(steps - 1)
    stack = [(0, steps - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        m = (a + b) // 2
        if m not in known:
            certain = {(x + y) // 2 for x, y in stack if y - x >= 2} | {m}
            prefetch(sorted(certain - set(known)))
        line = known[a] + (known[b] - known[a]) * (m - a) / (b - a)
        scale = max((abs(v) for v in known.values() if np.isfinite(v)), default=0.0) or 1e-12
        value = get(m)
        if np.isfinite([known[a], known[b], value]).all() and abs(value - line) <= tolerance * scale:
            continue  # the line through the ends explains the midpoint: interpolate [a, b]
        stack.append((m, b))
        stack.append((a, m))
    xs = np.array(sorted(known))
    values = np.interp(np.arange(steps), xs, np.array([known[x] for x in xs]))
    return SensitivityCurve(values=values, sampled=sorted(known))
