"""Per-step, per-block time embeddings (MTEO): hooks that replace what each slot of a model's time conditioning receives.

Which slots a model has, and what it feeds them itself, is `time_sites`' job (per-block embedders for DiT,
adaLN-single for PixArt). An override feeds one row of (slots, dim) vectors, each broadcast over the batch; the
class or text conditioning, and everything else, stays the model's. No diffusers code is copied or changed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.time_embeddings import METADATA_KEY, TENSOR_NAME, TimeEmbeddingsInfo
from tmpdiff.models.time_sites import time_sites


def embedding_slots(model: torch.nn.Module) -> list[str]:
    """The model's time-conditioning slots, in row order."""
    return time_sites(model).slots()


class EmbeddingOverride:
    """While a row is set, each slot receives that row's vector (broadcast over the batch) instead of the model's own.

    `row` is a (slots, dim) tensor (a learnable parameter's slice keeps its gradient); None passes through.
    """

    def __init__(self, model: torch.nn.Module, slots: list[str] | None = None) -> None:
        self.model = model
        self.sites = time_sites(model)
        self.slots = self.sites.slots() if slots is None else list(slots)
        self.row: torch.Tensor | None = None
        # rows to broadcast to, when known apart from the hooked call (an export: sized from the latent, so the
        # replaced embedding's output is not even needed for its shape and leaves the traced graph)
        self.rows: int | torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> EmbeddingOverride:
        self._handles = self.sites.install(self)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def vector(self, index: int, rows: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Slot `index`'s vector broadcast to the call's rows (None while no row is set)."""
        if self.row is None:
            return None
        if index >= len(self.slots):
            raise TmpdiffError(f"time conditioning call {index} has no slot ({len(self.slots)} recorded)")
        return self.row[index].to(dtype).expand(self.rows if self.rows is not None else rows, -1)

    @contextlib.contextmanager
    def at(self, row: torch.Tensor | None) -> Iterator[None]:
        """Feed `row` for the forward passes inside the block."""
        if row is not None and tuple(row.shape[:1]) != (len(self.slots),):
            raise TmpdiffError(f"embedding row of shape {tuple(row.shape)} for {len(self.slots)} slots")
        self.row = row
        try:
            yield
        finally:
            self.row = None


def own_embeddings(model: torch.nn.Module, timesteps: Sequence[float], rows: int = 1) -> torch.Tensor:
    """(steps, slots, dim): what each slot receives from the model itself at each timestep.

    Pass the sampler's row count (batch x 2 with guidance) to reproduce its embeddings bit for bit: a GEMM's result
    can depend on its row count in the last bits.
    """
    return time_sites(model).own(list(timesteps), rows=rows)


def save_time_embeddings(path: str | Path, tensor: torch.Tensor, info: TimeEmbeddingsInfo) -> None:
    """Write the tensor and its record to a safetensors file atomically."""
    from safetensors.torch import save_file

    from tmpdiff.formats.atomic import atomic_path

    if tuple(tensor.shape) != info.expected_shape():
        raise TmpdiffError(f"tensor of shape {tuple(tensor.shape)}, record says {info.expected_shape()}", path)
    with atomic_path(path) as tmp:
        save_file({TENSOR_NAME[info.kind]: tensor.detach().float().contiguous().clone()}, str(tmp),
                  metadata={METADATA_KEY: info.model_dump_json()})


def load_time_embeddings(path: str | Path) -> tuple[torch.Tensor, TimeEmbeddingsInfo]:
    """Read a time-embeddings file; anything missing, corrupt or inconsistent is a TmpdiffError naming the file."""
    from pydantic import ValidationError
    from safetensors import SafetensorError, safe_open

    from tmpdiff.formats.atomic import validation_problems

    path = Path(path)
    if not path.is_file():
        raise TmpdiffError("time-embeddings file is missing", path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TmpdiffError(f"not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else exc!r})",
                           path) from None
    if METADATA_KEY not in metadata:
        raise TmpdiffError(f"no '{METADATA_KEY}' metadata: not a tmpdiff time-embeddings file", path)
    try:
        info = TimeEmbeddingsInfo.model_validate(json.loads(metadata[METADATA_KEY]))
    except json.JSONDecodeError as exc:
        raise TmpdiffError(f"metadata is not valid JSON ({exc})", path) from None
    except RecursionError:
        raise TmpdiffError("metadata is not a valid JSON document: nested too deeply", path) from None
    except ValidationError as exc:
        raise TmpdiffError(f"not a valid time-embeddings record ({validation_problems(exc)})", path) from None
    name = TENSOR_NAME[info.kind]
    if set(tensors) != {name}:
        raise TmpdiffError(f"expected exactly the tensor '{name}', found {sorted(tensors)}", path)
    tensor = tensors[name]
    if tuple(tensor.shape) != info.expected_shape() or tensor.dtype != torch.float32:
        raise TmpdiffError(f"tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, expected float32 "
                           f"{info.expected_shape()}", path)
    if not bool(torch.isfinite(tensor).all()):
        raise TmpdiffError(f"tensor '{name}' holds NaN or infinite values", path)
    return tensor, info
