"""Shared fixtures: the bundled model, its fp32 export, and a fully exported + built build dir."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from tmpdiff.formats.weights_hash import CACHE_ENV
from tmpdiff.models.bundled import load_model_info

torch.set_num_threads(2)
# the tests, and the CLI processes they start, keep tmpdiff's user cache out of the user's home
os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="tmpdiff-test-cache-")

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


T2I_PROMPTS = ["a red 3 on a blue background", "a green 7 on a black background"]
T2I_STEPS = 4


@pytest.fixture(scope="session")
def t2i_int8_build(tmp_path_factory):
    """The bundled text-to-image transformer exported at fp32 + int8 (calibrated on 2 prompts x 1 seed x 4 steps
    through the CLI), its ORT engines and a stated costs table: (root, build_dir, prompts file)."""
    from tests.cli_helpers import cli

    root = tmp_path_factory.mktemp("t2i")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(["# calibration prompts", *T2I_PROMPTS]) + "\n")
    code, _, err = cli("export", "bundled-t2i", "--out", root, "--precisions", "fp32,int8", "--prompts", prompts,
                       "--calib-seeds", "0", "--calib-steps", T2I_STEPS)
    assert code == 0, err
    build = root / "tiny-t2i"
    code, _, err = cli("build", build, "--threads", 1)
    assert code == 0, err
    code, _, err = cli("costs", "--device", "test", "--ratio", "fp32=1,int8=0.5", "--source", "test",
                       "--out", root / "costs.json")
    assert code == 0, err
    return root, build, prompts
