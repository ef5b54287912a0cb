"""Engine calls reused when a run repeats one exactly: what makes exhaustive walks and searches cheap.

Schedules that share their first d steps give the denoiser the same inputs at those steps (same prompts or classes,
seeds and precisions so far), so running a schedule that shares a prefix with one already run repeats that prefix's
engine calls: the exhaustive walk in product order, a refinement move that changes step i of the current schedule,
a sensitivity probe that lowers one step of the uniform reference, an evolutionary child of an evaluated parent.
`CallMemo` keeps recent calls' outputs keyed by step index, precision and a 128-bit BLAKE2b digest of every input
tensor's name, dtype, shape and bytes; a call whose key matches returns the kept output instead of running the
engine. The key is computed from the inputs themselves, not from a schedule prefix the caller vouches for, so a
reused output is the one the engine gave for those exact inputs (engines are deterministic for fixed inputs; a
digest collision is as likely as guessing a 128-bit key). The caller's own code (scheduler, guidance, VAE) still
runs at every step; only engine time is saved. Outputs are kept in host memory (a GPU's is left to the engines), the
least recently used dropped beyond `max_bytes`. Hashing reads the inputs on the host: a memo is for calibration
runs, never for timed or deployed ones.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

DEFAULT_MAX_BYTES = 512 * 2**20


def digest(index: int, precision: str, feeds: Mapping[str, Any]) -> bytes:
    """128-bit BLAKE2b of a call: step, precision, every input's name and (tensors) dtype, shape and bytes or repr."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{index}\0{precision}".encode())
    for name in sorted(feeds):
        value = feeds[name]
        if isinstance(value, np.ndarray):  # by its bytes: repr() elides arrays of over 1,000 elements
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            tensor = value.detach().contiguous()
            h.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).cpu().numpy())
        else:
            h.update(f"\0{name}\0{value!r}".encode())
    return h.digest()


@dataclass
class _Call:
    output: torch.Tensor
    used: str
    fallback_from: str | None
    device: torch.device  # where the output was made; kept in host memory, not the device's


@dataclass
class CallMemo:
    """Recent engine calls by (step, precision, inputs' digest), reused by an identical call (see the module docstring)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    hits: int = 0
    misses: int = 0
    kept_bytes: int = 0
    run_by_engine: Counter[str] = field(default_factory=Counter)  # calls run (stored after a miss), by engine used
    _calls: OrderedDict[bytes, _Call] = field(default_factory=OrderedDict)

    @staticmethod
    def key(index: int, precision: str, feeds: Mapping[str, Any]) -> bytes:
        """The key of a call at step `index` (computed once per call, for `lookup` and then `store`)."""
        return digest(index, precision, feeds)

    def lookup(self, key: bytes) -> tuple[torch.Tensor, str, str | None] | None:
        """(output, engine used, fallback) of an identical earlier call, or None (counted as a miss)."""
        kept = self._calls.get(key)
        if kept is None:
            self.misses += 1
            return None
        self._calls.move_to_end(key)
        self.hits += 1
        return kept.output.to(kept.device, copy=True), kept.used, kept.fallback_from

    def store(self, key: bytes, output: torch.Tensor, used: str, fallback_from: str | None) -> None:
        """Keep this call's output (a copy: the caller's buffers are overwritten next step), dropping the least
        recently used calls beyond `max_bytes`. Every call stored was run, so it is counted by the engine that ran it."""
        self.run_by_engine[used] += 1
        old = self._calls.pop(key, None)
        if old is not None:
            self.kept_bytes -= _size(old.output)
        kept = _Call(output.detach().to("cpu", copy=True), used, fallback_from, output.device)
        self._calls[key] = kept
        self.kept_bytes += _size(kept.output)
        while self.kept_bytes > self.max_bytes and len(self._calls) > 1:
            _, dropped = self._calls.popitem(last=False)
            self.kept_bytes -= _size(dropped.output)

    def __len__(self) -> int:
        return len(self._calls)

    def counts(self) -> dict:
        """Engine calls run and reused so far, and the calls run by engine (for reports: engine time goes to the calls
        run, and a level's call can cost several times another's)."""
        return {"run": self.misses, "reused": self.hits, "run_by_engine": dict(sorted(self.run_by_engine.items()))}

    def summary(self) -> str:
        """One line for progress output: calls run (by engine) and reused."""
        by_engine = ", ".join(f"{n} {engine}" for engine, n in self.counts()["run_by_engine"].items())
        return f"{self.misses} run{f' ({by_engine})' if by_engine else ''}, {self.hits} reused"


def _size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@contextmanager
def attached(holder: Any, memo: CallMemo | None) -> Iterator[None]:
    """`holder.call_memo = memo` for the block, then None again; nothing when `memo` is None or the holder already
    has one (an enclosing walk's, which then keeps counting)."""
    if memo is None or holder.call_memo is not None:
        yield
        return
    holder.call_memo = memo
    try:
        yield
    finally:
        holder.call_memo = None
