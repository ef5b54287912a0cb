"""Graphs that take the per-block time embeddings as an input (MTEO deployment, zero inference overhead).

`tmpdiff export --time-embedding-input` wraps a denoiser's adapter: the graph's `timestep` input is replaced by
`time_embeddings`, one (slots, dim) float32 tensor (no batch axis: every row of a call is at the same step), whose
row i is what slot i (`time_sites`: a block's adaLN or the output layer) receives. The sinusoidal projection
and the embedder MLPs are then dead code and leave the graph. What the model itself would feed is kept as a table
of its own embedding at every integer training timestep (`own_table`), so plain schedules still run on these graphs;
an MTEO schedule feeds its learned rows instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import Manifest, artifact_problem
from tmpdiff.formats.specs import TensorSpec
from tmpdiff.models.adapter import DenoiserAdapter
from tmpdiff.models.time_embeddings import EmbeddingOverride, embedding_slots
from tmpdiff.models.time_sites import time_sites

INPUT_NAME = "time_embeddings"
OWN_TABLE_TENSOR = "own"  # the tensor of the own table's safetensors file
REPLACED_INPUT = "timestep"


class _EmbeddingInputModule(torch.nn.Module):
    """The base export module with each slot's embedder output taken from the `time_embeddings` input."""

    def __init__(self, base: torch.nn.Module, override: EmbeddingOverride, base_inputs: list[str]) -> None:
        super().__init__()
        self.embedding_input = base  # the name census.WRAPPER_SCOPES strips from node names
        self.override = override
        self.base_inputs = base_inputs  # the base module's positional inputs, `timestep` among them

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        *given, time_embeddings = args
        named = dict(zip([n for n in self.base_inputs if n != REPLACED_INPUT], given, strict=True))
        # the timestep only feeds the replaced embedders: a zero of the batch's length, dead in the traced graph
        named[REPLACED_INPUT] = torch.zeros(given[0].shape[0], dtype=torch.float32, device=given[0].device)
        self.override.rows = given[0].shape[0]
        try:
            with self.override, self.override.at(time_embeddings):
                return self.embedding_input(*(named[n] for n in self.base_inputs))
        finally:
            self.override.rows = None


class EmbeddingInputAdapter(DenoiserAdapter):
    """`base` with `timestep` replaced by a (slots, dim) `time_embeddings` input; everything else is the base's."""

    def __init__(self, base: DenoiserAdapter, slots: list[str], own_table: torch.Tensor) -> None:
        super().__init__(base.config)
        if REPLACED_INPUT not in [s.name for s in base.input_specs()]:
            raise TmpdiffError(f"{base.architecture} graphs have no {REPLACED_INPUT!r} input to replace")
        if own_table.dim() != 3 or own_table.shape[1] != len(slots):
            raise TmpdiffError(f"own time-embedding table of shape {tuple(own_table.shape)} for {len(slots)} slots")
        self.base, self.slots, self.own_table = base, list(slots), own_table
        self.architecture = base.architecture  # type: ignore[misc]  # the same model class, one more input

    @classmethod
    def for_model(cls, base: DenoiserAdapter, model: torch.nn.Module, train_timesteps: int) -> EmbeddingInputAdapter:
        """Probe the model's slots once and tabulate its own embedding at every training timestep."""
        return cls(base, embedding_slots(model), own_time_embedding_table(model, train_timesteps))

    @property
    def text_len(self) -> int:
        return self.base.text_len

    @property
    def dim(self) -> int:
        return int(self.own_table.shape[2])

    def input_specs(self) -> list[TensorSpec]:
        kept = [s for s in self.base.input_specs() if s.name != REPLACED_INPUT]
        return [*kept, TensorSpec(INPUT_NAME, "float32", (len(self.slots), self.dim))]

    def output_specs(self) -> list[TensorSpec]:
        return self.base.output_specs()

    def default_dims(self, batch: int = 1) -> dict[str, int]:
        return self.base.default_dims(batch)

    def export_module(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        base_inputs = [s.name for s in self.base.input_specs()]
        return _EmbeddingInputModule(self.base.export_module(model, dtype), EmbeddingOverride(model, self.slots),
                                     base_inputs).eval()

    def sample_inputs(self, dims: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
        """The base's sample inputs with the model's own embeddings of the sample's first timestep."""
        base = self.base.sample_inputs(dims, seed)
        t = int(base.pop(REPLACED_INPUT)[0].round().clamp(0, len(self.own_table) - 1))
        return {**base, INPUT_NAME: self.own_table[t].clone()}

    def integer_range(self, name: str) -> tuple[int, int]:
        return self.base.integer_range(name)

    def float_range(self, name: str) -> tuple[float, float] | None:
        return self.base.float_range(name)


def own_time_embedding_table(model: torch.nn.Module, train_timesteps: int) -> torch.Tensor:
    """(train_timesteps, slots, dim): what each slot receives from the model at each integer training timestep."""
    if train_timesteps < 1:
        raise TmpdiffError(f"train_timesteps must be at least 1, got {train_timesteps}")
    return time_sites(model).own(range(train_timesteps))


def load_own_table(build_dir: Path, manifest: Manifest) -> torch.Tensor | None:
    """The model's own embedding at every training timestep, for graphs with a `time_embeddings` input (None for
    other builds); a missing, altered or misshapen table is refused by name."""
    from safetensors import SafetensorError, safe_open

    entry = manifest.time_embedding_input
    if entry is None:
        return None
    path, problem = artifact_problem(Path(build_dir), entry.own_table, entry.sha256)
    if problem is not None:
        raise TmpdiffError(f"time-embedding table: {problem}; re-run `tmpdiff export ... --time-embedding-input`", path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            table = handle.get_tensor(OWN_TABLE_TENSOR)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        raise TmpdiffError(f"not a readable time-embedding table ({type(exc).__name__})", path) from None
    want = (entry.train_timesteps, len(entry.slots), entry.dim)
    if tuple(table.shape) != want or table.dtype != torch.float32:
        raise TmpdiffError(f"table is {table.dtype} {tuple(table.shape)}, the manifest says float32 {want}", path)
    return table


def adapter_for_build(build_dir: Path, manifest: Manifest) -> DenoiserAdapter:
    """The adapter of a build's graphs: the model class's, wrapped when they take a time-embeddings input."""
    from tmpdiff.models.registry import adapter_for_config

    base = adapter_for_config(manifest.denoiser_config)
    entry = manifest.time_embedding_input
    if entry is None:
        return base
    return EmbeddingInputAdapter(base, entry.slots, load_own_table(build_dir, manifest))
