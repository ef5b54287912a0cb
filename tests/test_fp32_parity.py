"""FP32 end to end: ORT runs the exported graph like torch runs the module."""

from __future__ import annotations

import numpy as np
import torch

from tmpdiff.engines.ort import OrtEngine
from tmpdiff.engines.torch_engine import TorchEngine
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.models.registry import adapter_for_config
from tmpdiff.models.schedulers import load_scheduler
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise


def test_manifest_records_fp32(fp32_build, bundled):
    manifest = load_manifest(fp32_build)
    assert manifest.architecture == "DiTTransformer2DModel"
    assert manifest.precisions["fp32"].onnx == "fp32/model.onnx"
    assert [i.name for i in manifest.inputs] == ["hidden_states", "timestep", "class_labels"]


def test_ort_matches_torch_on_random_inputs(fp32_build, torch_dit):
    adapter = adapter_for_config(dict(torch_dit.config) | {"_class_name": "DiTTransformer2DModel"})
    engine = OrtEngine(fp32_build / "fp32/model.onnx")
    module = adapter.export_module(torch_dit)
    for batch, seed in [(1, 11), (5, 12), (16, 13)]:  # batch differs from the export's trace batch
        inputs = adapter.sample_inputs(adapter.default_dims(batch), seed=seed)
        got = engine.infer({k: v.numpy() for k, v in inputs.items()})["noise_pred"]
        with torch.no_grad():
            want = module(*inputs.values()).numpy()
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 1e-4, f"batch {batch}: relative error {rel:.2e}"


def test_sampled_image_ort_matches_torch(fp32_build, torch_dit, bundled):
    """The shipped runner, once with the torch model as its engine and once with the ORT graph."""
    adapter = adapter_for_config(dict(torch_dit.config) | {"_class_name": "DiTTransformer2DModel"})
    labels = torch.arange(bundled.num_classes)
    noise = initial_noise(len(labels), 1, bundled.image_size, seed=5)
    runs = {}
    for name, engine in [("torch", TorchEngine.for_model(torch_dit, adapter)),
                         ("ort", OrtEngine(fp32_build / "fp32/model.onnx"))]:
        runner = ScheduledRunner({"fp32": engine}, len(labels), 1, bundled.image_size, bundled.guidance_scale,
                                 bundled.num_classes, bundled.num_classes)
        runs[name] = runner.sample(load_scheduler(bundled.scheduler_dir), labels, noise, ["fp32"] * bundled.default_steps).latents
    diff = (runs["torch"] - runs["ort"]).abs().max().item()
    assert diff < 1e-3, f"max abs difference {diff:.2e}"
    assert len(set(runs["ort"].flatten().tolist())) > 100  # a real image, not a constant
