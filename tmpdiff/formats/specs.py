"""Graph inputs and outputs: name, dtype and shape with named dynamic axes (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tmpdiff.formats.errors import TmpdiffError

Dim = int | str  # a fixed size, or the name of a dynamic axis
TEXT_MASK = "encoder_attention_mask"  # (batch, text_len) float32: 1 for a token, 0 for padding



@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, and shape with named dynamic axes."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        """The shape with every named axis replaced by its size in `dims`."""
        try:
            return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)
        except KeyError as exc:
            raise TmpdiffError(f"no size given for axis {exc.args[0]!r} of {self.name}") from None

    def check(self, array_shape: tuple[int, ...], dtype: np.dtype | str, dims: dict[str, int]) -> None:
        """Raise if an array does not fit this spec."""
        want = self.concrete(dims)
        if tuple(array_shape) != want:
            raise TmpdiffError(f"input {self.name!r} has shape {tuple(array_shape)}, expected {want}")
        if np.dtype(dtype) != np.dtype(self.dtype):
            raise TmpdiffError(f"input {self.name!r} has dtype {np.dtype(dtype)}, expected {self.dtype}")
