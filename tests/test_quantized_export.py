"""Quantized export of the bundled model: both graphs per precision, parity, census, caching, bad input."""

from __future__ import annotations

import hashlib
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
from tmpdiff.runtime.capture import sampled_recipe

from .conftest import small_calibration

QUANTIZED = ["int8", "fp8", "int4"]
ALL = ["fp32", "fp16", *QUANTIZED]


def _calibration(bundled):
    return small_calibration(bundled)


def _file_sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def test_every_precision_recorded(quant_build):
    """What the manifest says about each exported precision, checked against the files themselves."""
    _, build_dir, outcomes = quant_build
    manifest = load_manifest(build_dir)
    assert set(manifest.precisions) == set(ALL)
    spec_io = ([(s.name, s.dtype) for s in manifest.inputs], [(s.name, s.dtype) for s in manifest.outputs])
    for name, entry in manifest.precisions.items():
        precision = PRECISIONS[name]
        ort_path, trt_path = build_dir / entry.onnx, build_dir / entry.trt_onnx
        # every recorded hash is the file's own (hashed here, not by tmpdiff's helper)
        assert entry.sha256 == _file_sha256(ort_path), name
        assert entry.trt_sha256 == _file_sha256(trt_path), name
        for rel, digest in entry.artifacts.items():
            assert digest == _file_sha256(build_dir / rel), f"{name}: {rel}"
        if precision.modelopt_cfg is not None:  # the saved quantizer state is covered by the manifest's hashes
            assert {f"{name}/quant_state.safetensors", f"{name}/quant_config.json"} <= set(entry.artifacts), name
        # the opset in each graph file is the one recorded, and the one the precision table asks for
        ort_graph, trt_graph = onnx.load(ort_path), onnx.load(trt_path)
        assert _default_opset(ort_graph) == entry.opset == precision.ort_opset, name
        assert _default_opset(trt_graph) == precision.trt_opset, name
        # the ORT graph takes and returns exactly the tensors the manifest specifies, in order
        onnx_types = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}
        graph_io = ([(v.name, onnx_types.get(v.type.tensor_type.elem_type)) for v in ort_graph.graph.input],
                    [(v.name, onnx_types.get(v.type.tensor_type.elem_type)) for v in ort_graph.graph.output])
        assert graph_io == spec_io, name
        if precision.modelopt_cfg is None:
            assert entry.trt_onnx == entry.onnx and entry.quantization == {}, name
            continue
        assert entry.trt_onnx == f"{name}/model.trt.onnx" and entry.trt_sha256 != entry.sha256, name
        assert entry.error_vs_fp32 > 1e-5  # quantization really changed the maths
        calib = entry.quantization["calibration"]
        assert calib["batches"] == 10 and calib["classes"] == list(range(10))
        # the twin ORT runs uses standard ops only: int8/fp8 quantize activations (QuantizeLinear present),
        # int4 is weight-only (DequantizeLinear on weights, no QuantizeLinear)
        twin_ops = [(n.domain, n.op_type) for n in ort_graph.graph.node]
        assert all(domain in ("", "ai.onnx", "com.microsoft") for domain, _ in twin_ops), (name, set(twin_ops))
        assert ("", "DequantizeLinear") in twin_ops, name
        assert (("", "QuantizeLinear") in twin_ops) == (name != "int4"), name


def test_trt_graph_has_tensorrt_ops_and_twin_has_none(quant_build):
    """int4's TensorRT graph keeps TensorRT's int4 DequantizeLinear; fp8's is standard float8 Q/DQ (AutoCast can type
    it), the same ops as its twin but in fp16; no twin has a TensorRT op."""
    _, build_dir, _ = quant_build
    for name in ("fp8", "int4"):
        trt_ops = {(n.domain, n.op_type) for n in onnx.load(build_dir / name / "model.trt.onnx").graph.node}
        twin_ops = {(n.domain, n.op_type) for n in onnx.load(build_dir / name / "model.onnx").graph.node}
        assert any(domain == "trt" for domain, _ in trt_ops) == (name == "int4"), name
        assert not any(domain == "trt" for domain, _ in twin_ops), name
    fp8_trt = onnx.load(build_dir / "fp8" / "model.trt.onnx")
    assert sum(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in fp8_trt.graph.initializer) >= 24
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
    with pytest.raises(TmpdiffError, match="nvfp4 quantization needs CUDA .* not supported yet, on any machine"):
        export_model(bundled.transformer_dir, tmp_path, ["nvfp4"])
    assert not (tmp_path / "transformer").exists()  # refused before the build folder (and its lock) is made
    with pytest.raises(TmpdiffError, match="calibration set is empty"):
        export_model(bundled.transformer_dir, tmp_path, ["int8"],
                     calibration=sampled_recipe(sampling_info(bundled), classes=[], seeds=[0]))
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


def test_int8_smoothquant_exports_and_runs(quant_build, bundled, torch_dit, tmp_path):
    """modelopt INT8 SmoothQuant: the ORT twin computes the fake-quant model (pre-quant scales folded in) and its
    error vs fp32 is of the same order as plain int8's, on inputs the export never saw."""
    from safetensors.torch import load_file

    from tmpdiff.export.quantize import build_config, quantize

    _, int8_dir, _ = quant_build
    build_dir, outcomes = export_model(bundled.transformer_dir, tmp_path, ["fp32", "int8-sq"], model_id="tiny-dit",
                                       calibration=small_calibration(bundled))
    assert [(o.precision, o.skipped) for o in outcomes] == [("fp32", False), ("int8-sq", False)]
    entry = load_manifest(build_dir).precisions["int8-sq"]
    assert entry.quantization["modelopt_config"] == "INT8_SMOOTHQUANT_CFG"
    assert entry.quantization["census"]["both_quantized"] > 0
    adapter = adapter_for_config(dict(torch_dit.config) | {"_class_name": "DiTTransformer2DModel"})

    # The torch fake-quant reference, quantized here again with the same config and calibration set. It is the exported
    # model: its state equals the saved one, SmoothQuant's per-channel pre-quant scales included; and the saved state
    # restores to it (restore_quantized inserts the quantizers without SmoothQuant's forward loop, then loads it).
    calibration = small_calibration(bundled).capture(torch_dit, adapter)
    smooth = quantize(torch_dit, build_config(PRECISIONS["int8-sq"], torch_dit), calibration.batches,
                      lambda m, batch: adapter.export_module(m)(*batch.values()))
    saved = load_file(build_dir / "int8-sq" / "quant_state.safetensors")
    state = smooth.state_dict()
    assert any(k.endswith("input_quantizer._pre_quant_scale") for k in saved)
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)

    inputs = adapter.sample_inputs(adapter.default_dims(6), seed=4321)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    with torch.no_grad():
        fp32 = adapter.export_module(torch_dit)(*inputs.values()).numpy()
        restored = adapter.export_module(restore_quantized(torch_dit, build_dir / "int8-sq"))(*inputs.values())
        assert torch.allclose(restored, adapter.export_module(smooth)(*inputs.values()), rtol=1e-5, atol=1e-6)
    errors = {}
    for name, directory, quantized in (("int8-sq", build_dir, smooth), ("int8", int8_dir, restore_quantized(torch_dit, int8_dir / "int8"))):
        with torch.no_grad():
            want = adapter.export_module(quantized)(*inputs.values()).numpy()
        got = OrtEngine(directory / name / "model.onnx", optimization=PRECISIONS[name].ort_optimization).infer(feeds)["noise_pred"]
        parity = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert parity <= PRECISIONS[name].parity_tolerance, f"{name}: ORT vs torch fake quant {parity:.2e}"
        errors[name] = np.linalg.norm(got - fp32) / np.linalg.norm(fp32)
        print(f"{name}: parity {parity:.2e}, error vs fp32 {errors[name]:.2e}")
    assert errors["int8-sq"] > 1e-5, errors  # SmoothQuant really quantized
    assert errors["int8"] / 10 < errors["int8-sq"] < 10 * errors["int8"], errors


def test_the_export_table_marks_parity_accepted_above_tolerance(monkeypatch):
    """A quantized graph accepted by the same-quality rule (above its parity tolerance) is marked and explained."""
    import io
    from pathlib import Path
    from types import SimpleNamespace

    from rich.console import Console

    from tmpdiff.export import report
    from tmpdiff.export.exporter import ExportOutcome
    from tmpdiff.formats.precisions import get_precision

    out = io.StringIO()
    monkeypatch.setattr(report, "_console", Console(file=out, width=200))
    tolerance = get_precision("int8").parity_tolerance

    def entry(parity: float):
        return SimpleNamespace(parity_error=parity, error_vs_fp32=0.05, reference_dtype="float32", quantization={})

    report.print_export_table([ExportOutcome("int8", Path("int8/model.onnx"), False, 1.0, entry(tolerance / 2))])
    assert " *" not in out.getvalue() and "above the precision's parity tolerance" not in out.getvalue()
    report.print_export_table([ExportOutcome("int8", Path("int8/model.onnx"), False, 1.0, entry(3 * tolerance))])
    assert f"{3 * tolerance:.1e} *" in out.getvalue() and "above the precision's parity tolerance" in out.getvalue()
