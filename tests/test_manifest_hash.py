"""The model's weights hash, remembered across commands by file identity (`formats/weights_hash.py`)."""

from __future__ import annotations

import json
import shutil

import pytest

from tmpdiff.formats import atomic, weights_hash
from tmpdiff.formats.manifest import model_content_hash


@pytest.fixture
def model_dir(bundled, tmp_path, monkeypatch):
    """A copy of the bundled denoiser, its weights counted as large enough to remember, and a cache of its own."""
    monkeypatch.setenv(weights_hash.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(weights_hash, "MIN_CACHED_BYTES", 0)
    return shutil.copytree(bundled.transformer_dir, tmp_path / "model")


def test_weights_are_read_once_per_file_identity_and_again_when_rewritten(model_dir, monkeypatch):
    first = model_content_hash(model_dir)
    cached = json.loads(weights_hash.cache_file().read_text())
    assert cached["format"] == weights_hash.FORMAT and str((model_dir / "diffusion_pytorch_model.safetensors").resolve()) \
        in cached["files"]
    read: list = []
    original = atomic.sha256_file
    monkeypatch.setattr(weights_hash, "sha256_file", lambda path: read.append(path) or original(path))
    assert model_content_hash(model_dir) == first and read == []  # the cache answered
    weights = model_dir / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, same place: a rewritten checkpoint
    weights.write_bytes(bytes(data))
    assert model_content_hash(model_dir) != first and read == [weights]
    weights_hash.cache_file().write_text("{not json")  # a damaged cache costs a hash, never an error
    assert model_content_hash(model_dir) != first and len(read) == 2


def test_small_files_and_an_unwritable_cache_are_hashed_every_time(model_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(weights_hash, "MIN_CACHED_BYTES", 1 << 40)
    model_content_hash(model_dir)
    assert not weights_hash.cache_file().exists()
    monkeypatch.setattr(weights_hash, "MIN_CACHED_BYTES", 0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(weights_hash.CACHE_ENV, str(blocker / "cache"))  # its parent is a file: nothing can be written
    assert model_content_hash(model_dir) == model_content_hash(model_dir)
