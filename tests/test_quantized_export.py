"""Quantized export of the bundled model: both graphs per precision, parity, census, caching, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from tmpdiff.engines.ort import OrtEngine
from tmpdiff.export.census import census
from tmpdiff.export.exporter import export_model, parse_precisions
from tmpdiff.export.onnx_io import load_onnx, save_onnx
from tmpdiff.export.quantize import restore_quantized
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import load_manifest, verify_artifact
from tmpdiff.formats.precisions import PRECISIONS
from tmpdiff.models.bundled import sampling_info
from tmpdiff.models.registry import adapter_for_config
from tmpdiff.runtime.capture import sampled_calibration

from .conftest import small_calibration

QUANTIZED = ["int8", "fp8", "int4"]
ALL = ["fp32", "fp16", *QUANTIZED]


def _calibration(bundled):
    return small_calibration(bundled)


def test_every_precision_recorded(quant_build):
    _, build_dir, outcomes = quant_build
    manifest = load_manifest(build_dir)
    assert set(manifest.precisions) == set(ALL)
    for name, entry in manifest.precisions.items():
        assert entry.parity_error <= PRECISIONS[name].parity_tolerance, name
        verify_artifact(build_dir, name, entry)
    for name in QUANTIZED:
        entry = manifest.precisions[name]
        assert entry.trt_onnx == f"{name}/model.trt.onnx"
        assert entry.error_vs_fp32 > 1e-5  # quantization really changed the maths
        calib = entry.quantization["calibration"]
        assert calib["batches"] == 10 and calib["classes"] == list(range(10))


def test_trt_graph_has_tensorrt_ops_and_twin_has_none(quant_build):
    _, build_dir, _ = quant_build
    for name in ("fp8", "int4"):
        trt_ops = {(n.domain, n.op_type) for n in onnx.load(build_dir / name / "model.trt.onnx").graph.node}
        twin_ops = {(n.domain, n.op_type) for n in onnx.load(build_dir / name / "model.onnx").graph.node}
        assert any(domain == "trt" for domain, _ in trt_ops), name
        assert not any(domain == "trt" for domain, _ in twin_ops), name
    twin = onnx.load(build_dir / "int4" / "model.onnx")
    assert any(i.data_type == onnx.TensorProto.INT4 for i in twin.graph.initializer)
    assert twin.opset_import[0].version >= 21
    fp8 = onnx.load(build_dir / "fp8" / "model.onnx")
    assert any(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in fp8.graph.initializer)


def test_census_every_quantized_layer_has_qdq(quant_build):
    _, build_dir, outcomes = quant_build
    for name in QUANTIZED:
        rows = census(onnx.load(build_dir / name / "model.trt.onnx"))
        linear_rows = [r for r in rows if r.module.split(".")[-1] in {"to_q", "to_k", "to_v", "0", "proj", "2"}
                       and r.module.startswith("transformer_blocks")]
        assert len(linear_rows) == 24, name  # 6 GEMMs x 4 blocks
        assert all(r.weight_quantized for r in linear_rows), name
        assert all(r.input_quantized for r in linear_rows) == (name != "int4"), name
        # the sensitive layers stay high precision
        assert not any(r.weight_quantized for r in rows if "proj_out" in r.module or "pos_embed" in r.module), name


def test_ort_twin_matches_restored_torch_state_on_fresh_inputs(quant_build, torch_dit):
    """Parity again, from the saved quantized state (no recalibration) and inputs never seen before."""
    _, build_dir, _ = quant_build
    adapter = adapter_for_config(dict(torch_dit.config) | {"_class_name": "DiTTransformer2DModel"})
    for name in QUANTIZED:
        quantized = restore_quantized(torch_dit, build_dir / name)
        inputs = adapter.sample_inputs(adapter.default_dims(6), seed=777)
        with torch.no_grad():
            want = adapter.export_module(quantized)(*inputs.values()).numpy()
        engine = OrtEngine(build_dir / name / "model.onnx", optimization=PRECISIONS[name].ort_optimization)
        got = engine.infer({k: v.numpy() for k, v in inputs.items()})["noise_pred"]
        error = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert error <= PRECISIONS[name].parity_tolerance, f"{name}: {error:.2e}"


def test_rerun_is_noop_and_changed_config_rebuilds(quant_build, bundled, tmp_path):
    from tmpdiff.models.bundled import sampling_info

    _, build_dir, _ = quant_build
    root = tmp_path / "copy"
    shutil.copytree(build_dir, root / "tiny-dit")  # the session's build dir stays untouched
    before = (root / "tiny-dit" / "manifest.json").read_bytes()
    _, again = export_model(bundled.transformer_dir, root, ALL, model_id="tiny-dit", calibration=_calibration(bundled),
                            sampling=sampling_info(bundled))
    assert all(o.skipped for o in again)
    assert (root / "tiny-dit" / "manifest.json").read_bytes() == before
    # a different set of high-precision layers is a different artifact
    _, changed = export_model(bundled.transformer_dir, root, ["int8"], model_id="tiny-dit",
                              calibration=_calibration(bundled), keep_high_precision=("*proj_out*",))
    assert not changed[0].skipped
    assert load_manifest(root / "tiny-dit").precisions["int8"].key != json.loads(before)["precisions"]["int8"]["key"]


def test_tampered_artifact_is_refused_then_rebuilt(quant_build, bundled, tmp_path):
    root, build_dir, _ = quant_build
    copy_root = tmp_path / "copy"
    shutil.copytree(build_dir, copy_root / "tiny-dit")
    target = copy_root / "tiny-dit" / "fp16" / "model.onnx"
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    entry = load_manifest(copy_root / "tiny-dit").precisions["fp16"]
    with pytest.raises(TmpdiffError, match="sha256 does not match"):
        verify_artifact(copy_root / "tiny-dit", "fp16", entry)
    _, outcomes = export_model(bundled.transformer_dir, copy_root, ["fp16"], model_id="tiny-dit")
    assert not outcomes[0].skipped
    verify_artifact(copy_root / "tiny-dit", "fp16", load_manifest(copy_root / "tiny-dit").precisions["fp16"])


def test_bad_precisions_and_calibration(bundled, tmp_path):
    with pytest.raises(TmpdiffError, match="unknown precision 'fp7'"):
        parse_precisions("fp32,fp7")
    if not torch.cuda.is_available():
        with pytest.raises(TmpdiffError, match="nvfp4 quantization needs CUDA"):
            export_model(bundled.transformer_dir, tmp_path, ["nvfp4"])
    with pytest.raises(TmpdiffError, match="calibration set is empty"):
        export_model(bundled.transformer_dir, tmp_path, ["int8"],
                     calibration=lambda m, a: sampled_calibration(m, a, sampling_info(bundled), classes=[], seeds=[0]))
    assert not list(tmp_path.rglob("*.onnx"))


def test_large_graph_goes_to_external_data(tmp_path, fp32_build):
    model = onnx.load(fp32_build / "fp32" / "model.onnx")
    written = save_onnx(model, tmp_path / "big" / "model.onnx", force_external=True)
    assert [p.name for p in written] == ["model.onnx.data", "model.onnx"]
    # initializers moved out; only Constant-node values stay inline
    assert (tmp_path / "big" / "model.onnx").stat().st_size < (fp32_build / "fp32" / "model.onnx").stat().st_size / 10
    load_onnx(tmp_path / "big" / "model.onnx")
    # a graph whose external data points outside its directory is refused
    evil = onnx.load(tmp_path / "big" / "model.onnx", load_external_data=False)
    for tensor in evil.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    (tmp_path / "evil").mkdir()
    onnx.save_model(evil, tmp_path / "evil" / "model.onnx")
    with pytest.raises(TmpdiffError, match="escapes the build directory"):
        load_onnx(tmp_path / "evil" / "model.onnx")


@pytest.mark.parametrize("damage", [b"", b"not a protobuf at all", None])
def test_corrupt_onnx_is_clear_error(tmp_path, fp32_build, damage):
    data = (fp32_build / "fp32" / "model.onnx").read_bytes()
    path = tmp_path / "model.onnx"
    path.write_bytes(data[: len(data) // 3] if damage is None else damage)
    with pytest.raises(TmpdiffError, match="model.onnx"):
        load_onnx(path)
    with pytest.raises(TmpdiffError, match="ONNX Runtime cannot load"):
        OrtEngine(path)
