"""Per-step records, a Chrome trace writer, and NVTX ranges that cost nothing when no profiler listens."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tmpdiff.formats.atomic import write_json


@dataclass
class StepEvent:
    index: int
    timestep: int
    precision: str
    start_s: float
    seconds: float
    fallback_from: str | None = None


@dataclass
class RunTrace:
    """What ran: one event per step (with the precision actually used) and every NaN/Inf fallback."""

    steps: list[StepEvent] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[StepEvent]:
        return [s for s in self.steps if s.fallback_from is not None]

    @property
    def switches(self) -> int:
        return sum(a.precision != b.precision for a, b in zip(self.steps, self.steps[1:], strict=False))

    def write_chrome_trace(self, path: str | Path) -> None:
        """Chrome trace-event JSON (chrome://tracing, Perfetto): one complete event per step, instants at switches."""
        events = []
        origin = self.steps[0].start_s if self.steps else 0.0
        previous = None
        for step in self.steps:
            ts = (step.start_s - origin) * 1e6
            if previous is not None and previous != step.precision:
                events.append({"name": f"switch {previous} -> {step.precision}", "ph": "i", "s": "t", "ts": ts,
                               "pid": 1, "tid": 1})
            events.append({"name": f"step {step.index} {step.precision}", "ph": "X", "ts": ts, "dur": step.seconds * 1e6,
                           "pid": 1, "tid": 1, "cat": step.precision,
                           "args": {"timestep": step.timestep, "fallback_from": step.fallback_from}})
            previous = step.precision
        write_json(path, {"traceEvents": events, "displayTimeUnit": "ms"})


class StepClock:
    """Per-step wall times without host synchronisation: perf_counter on the host, CUDA events on a GPU stream.

    `mark()` records a point on the stream; `seconds(a, b)` is only asked after the run has synchronised once.
    """

    def __init__(self, torch_stream: torch.cuda.Stream | None = None) -> None:
        self.torch_stream = torch_stream

    def mark(self) -> float | torch.cuda.Event:
        if self.torch_stream is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.torch_stream)
        return event

    @staticmethod
    def seconds(start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
        if isinstance(start, float):
            return end - start
        return start.elapsed_time(end) / 1e3


def nvtx_wanted() -> bool:
    """NVTX ranges only when an Nsight tool is injected (it sets NVTX_INJECTION64_PATH) or when asked."""
    return bool(os.environ.get("NVTX_INJECTION64_PATH") or os.environ.get("TMPDIFF_NVTX"))


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    import nvtx

    nvtx.push_range(name, domain="tmpdiff")
    try:
        yield
    finally:
        nvtx.pop_range(domain="tmpdiff")
