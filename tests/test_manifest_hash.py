"""The model's weights hash, remembered across commands by file identity (`formats/weights_hash.py`)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tmpdiff.formats import weights_hash
from tmpdiff.formats.manifest import model_content_hash

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def model_dir(bundled, tmp_path, monkeypatch):
    """A copy of the bundled denoiser, its weights counted as large and old enough to remember, a cache of its own,
    and a count of the files hashed (`hashed`)."""
    monkeypatch.setenv(weights_hash.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(weights_hash, "MIN_CACHED_BYTES", 0)
    monkeypatch.setattr(weights_hash, "RACY_NS", 0)
    hashed: list = []
    digest = weights_hash.sha256_of
    monkeypatch.setattr(weights_hash, "sha256_of", lambda fh: hashed.append(fh.name) or digest(fh))
    model = shutil.copytree(bundled.transformer_dir, tmp_path / "model")
    return model, hashed


def test_weights_are_read_once_per_file_identity_and_again_when_rewritten(model_dir):
    model, hashed = model_dir
    first = model_content_hash(model)
    cached = json.loads(weights_hash.cache_file().read_text())
    assert cached["format"] == weights_hash.FORMAT and str((model / WEIGHTS).resolve()) in cached["files"]
    assert model_content_hash(model) == first and len(hashed) == 1  # the cache answered
    weights = model / WEIGHTS
    old = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, same place, and the old modification time put back: only the change time moves
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert model_content_hash(model) != first and len(hashed) == 2
    for damaged in ("{not json", "[" * 100_000, json.dumps({"format": weights_hash.FORMAT, "files": {
            str(weights.resolve()): {"identity": "forged", "sha256": "0" * 64}}})):
        weights_hash.cache_file().write_text(damaged)  # a damaged or odd cache costs a hash, never an error
        assert model_content_hash(model) != first
    assert len(hashed) == 5


def test_small_recent_or_switched_off_files_and_an_unwritable_cache_are_hashed_every_time(model_dir, monkeypatch,
                                                                                          tmp_path):
    model, hashed = model_dir
    for setting in ((weights_hash, "MIN_CACHED_BYTES", 1 << 40), (weights_hash, "RACY_NS", 10**18)):
        with monkeypatch.context() as patch:
            patch.setattr(*setting)
            model_content_hash(model)
            model_content_hash(model)
    with monkeypatch.context() as patch:
        patch.setenv(weights_hash.SWITCH_ENV, "0")
        model_content_hash(model)
    assert len(hashed) == 5 and not weights_hash.cache_file().exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(weights_hash.CACHE_ENV, str(blocker / "cache"))  # its parent is a file: nothing can be written
    model_content_hash(model)
    model_content_hash(model)
    assert len(hashed) == 7
