"""Text-encoder outputs reused across pipeline calls that encode the same prompts: a calibration or bench calls the
pipeline hundreds of times with one prompt list, and on a small denoiser re-encoding it is a fifth of each call.

`EncoderMemo` wraps one encoder's `forward`: a call whose arguments (every tensor's name, dtype, shape and bytes,
every other value's repr; `call_memo`'s digest) match a kept call returns a copy of the kept output, tensors cloned,
so the pipeline may change what it gets without touching what is kept. `memoized_encoders` installs one memo per
text encoder of a pipeline for the duration of a block and removes them after, leaving the pipeline as it was.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tmpdiff.runtime.call_memo import digest

ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _copy(value: Any) -> Any:
    """`value` with every tensor in it cloned (tuples, lists, dicts and transformers' ModelOutput kept as they are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        copied = {k: _copy(v) for k, v in value.items()}
        try:
            return type(value)(**copied)
        except TypeError:
            return copied
    return value


class EncoderMemo:
    """One encoder's calls, by their arguments' digest; at most `max_entries` kept (least recently used dropped)."""

    def __init__(self, forward: Callable[..., Any], max_entries: int = 16) -> None:
        self.forward = forward
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._kept: OrderedDict[bytes, Any] = OrderedDict()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = digest(0, "", {f"arg{i}": a for i, a in enumerate(args)} | kwargs)
        if key in self._kept:
            self._kept.move_to_end(key)
            self.hits += 1
            return _copy(self._kept[key])
        self.misses += 1
        output = self.forward(*args, **kwargs)
        self._kept[key] = _copy(output)
        while len(self._kept) > self.max_entries:
            self._kept.popitem(last=False)
        return output


@contextmanager
def memoized_encoders(pipe: object, memos: dict[str, EncoderMemo]) -> Iterator[dict[str, EncoderMemo]]:
    """Within the block, each text encoder of `pipe` answers from its memo in `memos` (created on first use, kept by
    the caller across blocks); afterwards the encoders are as they were."""
    installed = []
    try:
        for name in ENCODER_NAMES:
            encoder = getattr(pipe, name, None)
            if not isinstance(encoder, torch.nn.Module) or "forward" in vars(encoder):
                continue  # absent, or already wrapped by an enclosing block
            memo = memos.get(name)
            if memo is None or memo.forward.__self__ is not encoder:  # type: ignore[attr-defined]
                memo = memos[name] = EncoderMemo(encoder.forward)
            encoder.forward = memo  # nn.Module.__call__ looks the instance attribute up first
            installed.append(encoder)
        yield memos
    finally:
        for encoder in installed:
            del encoder.forward
