"""Shared fixtures: the bundled model and its fp32 export, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tmpdiff.models.bundled import load_model_info

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def bundled():
    return load_model_info()


@pytest.fixture(scope="session")
def fp32_build(tmp_path_factory, bundled) -> Path:
    """Build dir with the bundled model exported to fp32 ONNX."""
    from tmpdiff.export.pipeline import export_model

    build_dir, _ = export_model(bundled.transformer_dir, tmp_path_factory.mktemp("build"), ["fp32"], model_id="tiny-dit")
    return build_dir


@pytest.fixture(scope="session")
def torch_dit(bundled):
    from tmpdiff.models.loading import load_diffusers_model

    return load_diffusers_model(bundled.transformer_dir)
