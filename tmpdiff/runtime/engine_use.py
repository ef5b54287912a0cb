"""Engines shared by several runners or denoisers: whose buffers each engine is bound to, and who is running it.

An engine reads and writes the buffers it was last bound to. A service that loads a build's engines once and keeps a
runner per batch size (or a denoiser per pipeline) shares them, so each user re-binds them to its own buffers before
it runs them (`ensure_bound`, a dictionary lookup when nothing changed), and a set of engines runs one call at a time:
a second thread's call on engines in use is refused (`exclusive`), never interleaved into wrong results.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping

import torch

from tmpdiff.engines.base import Engine
from tmpdiff.engines.streams import GPU_LOCK
from tmpdiff.formats.errors import TmpdiffError

_bound_to: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> weakref of the owner of its buffers
_in_use: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> lock held while a call runs it
_registry_lock = threading.Lock()


def ensure_bound(owner: object, engines: Iterable[Engine], inputs: Mapping[str, torch.Tensor],
                 outputs: Mapping[str, torch.Tensor], *, force: bool = False) -> None:
    """Bind every engine to `owner`'s buffers unless it is bound to them already (`force`: new buffers)."""
    for engine in engines:
        holder = _bound_to.get(engine)
        if force or holder is None or holder() is not owner:
            engine.bind(inputs, outputs)
            _bound_to[engine] = weakref.ref(owner)


def release(engines: Iterable[Engine]) -> None:
    """Drop the engines' bindings (they stay loaded: other runners share them); whoever runs them next binds them to
    its buffers again."""
    for engine in engines:
        engine.unbind()
        _bound_to.pop(engine, None)


def close_engines(engines: Iterable[Engine]) -> None:
    """Unbind and free engines their loader is done with (a TensorRT plan's context, engine and activation memory)."""
    engines = list(engines)
    release(engines)
    for engine in engines:
        engine.close()


def _lock_of(engine: Engine) -> threading.Lock:
    with _registry_lock:
        lock = _in_use.get(engine)
        if lock is None:
            lock = _in_use[engine] = threading.Lock()
        return lock


@contextlib.contextmanager
def exclusive(engines: Iterable[Engine], who: str) -> Iterator[None]:
    """Hold every engine for one call; engines already running another call (another thread's) are refused."""
    held: list = []  # the locks taken, released in reverse order
    engines = list(engines)
    try:
        if any(getattr(engine, "device", "cpu") != "cpu" for engine in engines):
            if not GPU_LOCK.acquire(blocking=False):
                raise TmpdiffError(f"{who}: GPU engines of this process are running another call (another thread): "
                                   "they share one CUDA stream and one activation memory, so one call runs at a time; "
                                   "queue the requests, or serve from one process per concurrent call")
            held.append(GPU_LOCK)
        for engine in engines:
            lock = _lock_of(engine)
            if not lock.acquire(blocking=False):
                raise TmpdiffError(f"{who}: its engines are running another call (another thread): a set of engines "
                                   "runs one call at a time; load the engines once per thread")
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()
