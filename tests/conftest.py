"""Shared fixtures: the bundled model, its fp32 export, and a fully exported + built build dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tmpdiff.models.bundled import load_model_info

torch.set_num_threads(2)

QUANTIZED = ["int8", "fp8", "int4"]
ALL_PRECISIONS = ["fp32", "fp16", *QUANTIZED]


@pytest.fixture(scope="session")
def bundled():
    return load_model_info()


@pytest.fixture(scope="session")
def fp32_build(tmp_path_factory, bundled) -> Path:
    """Build dir with the bundled model exported to fp32 ONNX."""
    from tmpdiff.export.exporter import export_model

    build_dir, _ = export_model(bundled.transformer_dir, tmp_path_factory.mktemp("build"), ["fp32"], model_id="tiny-dit")
    return build_dir


@pytest.fixture(scope="session")
def torch_dit(bundled):
    from tmpdiff.models.loading import load_diffusers_model

    return load_diffusers_model(bundled.transformer_dir)


def small_calibration(bundled):
    """10 classes x 1 seed x 10 steps: enough to calibrate the tiny model, quick to capture."""
    from tmpdiff.models.bundled import sampling_info
    from tmpdiff.runtime.capture import sampled_recipe

    return sampled_recipe(sampling_info(bundled), classes=range(10), seeds=[0], steps=10)


@pytest.fixture(scope="session")
def quant_build(tmp_path_factory, bundled):
    """Every precision exported (with sampling info) and built as ORT-CPU engines: (root, build_dir, outcomes)."""
    from tmpdiff.engines.build import build_engines
    from tmpdiff.export.exporter import export_model
    from tmpdiff.models.bundled import sampling_info

    root = tmp_path_factory.mktemp("qbuild")
    build_dir, outcomes = export_model(bundled.transformer_dir, root, ALL_PRECISIONS, model_id="tiny-dit",
                                       calibration=small_calibration(bundled), sampling=sampling_info(bundled))
    build_engines(build_dir, "ort", "cpu")
    return root, build_dir, {o.precision: o for o in outcomes}
