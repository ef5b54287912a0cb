"""The build side of `--time-embedding-input`: the model's own embedding table, written and hashed in the build
directory, and the adapter whose graphs take the embeddings as an input."""

from __future__ import annotations

from pathlib import Path

import torch

from tmpdiff.formats.atomic import atomic_path, sha256_file
from tmpdiff.formats.manifest import Manifest, SamplingInfo, TimeEmbeddingInputEntry, artifact_problem
from tmpdiff.models.adapter import DenoiserAdapter
from tmpdiff.models.time_embedding_input import INPUT_NAME, OWN_TABLE_TENSOR, EmbeddingInputAdapter, load_own_table

OWN_TABLE_NAME = "own_time_embeddings.safetensors"
DEFAULT_TRAIN_TIMESTEPS = 1000  # diffusers' default when the sampling info names no scheduler config


def new_embedding_input(build_dir: Path, base: DenoiserAdapter, model: torch.nn.Module,
                        sampling: SamplingInfo | None) -> tuple[EmbeddingInputAdapter, TimeEmbeddingInputEntry]:
    """Probe the model's slots, tabulate its own embeddings at every training timestep, write the table."""
    from safetensors.torch import save_file

    train = train_timesteps(sampling)
    adapter = EmbeddingInputAdapter.for_model(base, model, train)
    path = build_dir / OWN_TABLE_NAME
    build_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({OWN_TABLE_TENSOR: adapter.own_table}, str(tmp))
    entry = TimeEmbeddingInputEntry(input=INPUT_NAME, slots=adapter.slots, dim=adapter.dim, train_timesteps=train,
                                    own_table=OWN_TABLE_NAME, sha256=sha256_file(path))
    return adapter, entry


def train_timesteps(sampling: SamplingInfo | None) -> int:
    """The training timesteps the table covers: the sampling scheduler's, else diffusers' default."""
    if sampling is None:
        return DEFAULT_TRAIN_TIMESTEPS
    return int(sampling.scheduler_config.get("num_train_timesteps", DEFAULT_TRAIN_TIMESTEPS))


def kept_embedding_input(build_dir: Path, manifest: Manifest, base: DenoiserAdapter, model_hash: str,
                         sampling: SamplingInfo | None) -> tuple[EmbeddingInputAdapter, TimeEmbeddingInputEntry] | None:
    """The previous export's adapter and entry when they are this model's, cover the same training timesteps and
    the table is intact, else None."""
    entry = manifest.time_embedding_input
    if entry is None or manifest.model_sha256 != model_hash or entry.train_timesteps != train_timesteps(sampling):
        return None
    if artifact_problem(build_dir, entry.own_table, entry.sha256)[1] is not None:
        return None
    table = load_own_table(build_dir, manifest)
    return EmbeddingInputAdapter(base, entry.slots, table), entry
