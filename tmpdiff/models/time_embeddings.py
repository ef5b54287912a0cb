"""Per-step, per-block time embeddings (MTEO): forward hooks that replace what each block's adaLN receives.

In diffusers' `DiTTransformer2DModel` every transformer block's `norm1` (AdaLayerNormZero) owns a
`CombinedTimestepLabelEmbeddings`: the timestep goes through `time_proj` (sinusoidal) and `timestep_embedder`
(MLP), and the class embedding is added. The output layer calls block 0's embedder a second time. A *slot* is one
call of a `timestep_embedder` in a forward pass, in call order (for the bundled DiT: blocks 0-3, then the output
layer), and an override replaces that call's output with a vector of its own, broadcast over the batch. The class
embedding, and everything else, stays the model's. No diffusers code is copied or changed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.time_embeddings import METADATA_KEY, TENSOR_NAME, TimeEmbeddingsInfo

EMBEDDER_SUFFIX = "timestep_embedder"


def _embedders(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    found = {name: module for name, module in model.named_modules() if name.endswith(EMBEDDER_SUFFIX)}
    if not found:
        raise TmpdiffError(f"{type(model).__name__} has no '*.{EMBEDDER_SUFFIX}' modules: no time embedding to replace")
    return found


def _probe_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    config = model.config
    size, channels = int(config.sample_size), int(config.in_channels)
    return {"hidden_states": torch.zeros(1, channels, size, size), "timestep": torch.zeros(1),
            "class_labels": torch.zeros(1, dtype=torch.long)}


@torch.no_grad()
def embedding_slots(model: torch.nn.Module) -> list[str]:
    """The `timestep_embedder` calls of one forward pass, in order (a module called twice is two slots)."""
    calls: list[str] = []
    handles = [module.register_forward_hook(lambda _m, _i, _o, name=name: calls.append(name))
               for name, module in _embedders(model).items()]
    try:
        model(**_probe_inputs(model))
    finally:
        for handle in handles:
            handle.remove()
    seen: dict[str, int] = {}
    slots = []
    for name in calls:
        seen[name] = seen.get(name, 0) + 1
        slots.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return slots


class EmbeddingOverride:
    """While a row is set, each slot's `timestep_embedder` output is that row's vector (broadcast over the batch).

    `row` is a (slots, dim) tensor (a learnable parameter's slice keeps its gradient); None passes through.
    """

    def __init__(self, model: torch.nn.Module, slots: list[str] | None = None) -> None:
        self.model = model
        self.slots = embedding_slots(model) if slots is None else list(slots)  # known slots: no probing forward pass
        self.row: torch.Tensor | None = None
        # rows to broadcast to, when known apart from the embedder (an export: sized from the latent, so the
        # replaced embedder's output is not even needed for its shape and leaves the traced graph)
        self.rows: int | torch.Tensor | None = None
        self._calls = 0
        self._handles: list = []

    def __enter__(self) -> EmbeddingOverride:
        self._handles.append(self.model.register_forward_pre_hook(self._reset))
        for name, module in _embedders(self.model).items():
            self._handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: self._replace(name, out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _reset(self, *_args) -> None:
        self._calls = 0

    def _replace(self, name: str, out: torch.Tensor) -> torch.Tensor | None:
        index = self._calls
        self._calls += 1
        if self.row is None:
            return None
        if index >= len(self.slots) or self.slots[index].split("#")[0] != name:
            raise TmpdiffError(f"time embedding call {index} is {name}, not the slot recorded for it")
        vector = self.row[index].to(out.dtype)
        return vector.expand_as(out) if self.rows is None else vector.expand(self.rows, -1)

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


@torch.no_grad()
def own_embeddings(model: torch.nn.Module, timesteps: list[float], rows: int = 1) -> torch.Tensor:
    """(steps, slots, dim): what each slot receives from the model itself at each timestep.

    Computed by the slot's own `time_proj` and `timestep_embedder` on `rows` copies of the timestep and taking the
    first: a GEMM's result can depend on its row count in the last bits, so pass the sampler's row count (batch x 2
    with guidance) to reproduce its embeddings bit for bit.
    """
    modules = dict(model.named_modules())
    out = []
    for t in timesteps:
        per_slot = []
        for slot in embedding_slots(model):
            name = slot.split("#")[0]
            parent = modules[name.rsplit(".", 1)[0]] if "." in name else model
            proj = parent.time_proj(torch.full((rows,), float(t)))
            per_slot.append(modules[name](proj.to(torch.float32))[0])
        out.append(torch.stack(per_slot))
    return torch.stack(out)


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
