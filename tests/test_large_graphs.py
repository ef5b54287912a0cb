"""The large-model path (graphs whose weights go to external `.data` files), forced on the bundled model by lowering
the threshold: export, build, check and run all see the `.data` files, hash them, and refuse a damaged one by name."""

from __future__ import annotations

import shutil

import onnx
import pytest

from tests.cli_helpers import cli
from tests.conftest import small_calibration
from tmpdiff.engines.build import build_engines
from tmpdiff.export.exporter import export_model
from tmpdiff.export.onnx_io import external_data_threshold, is_large, tensor_bytes, weightless
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.models.bundled import sampling_info


@pytest.fixture(scope="module")
def external_build(tmp_path_factory, bundled):
    """fp32 and int8 exported with every graph over the (lowered) threshold, and built for ORT-CPU."""
    root = tmp_path_factory.mktemp("large")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIFF_EXTERNAL_DATA_BYTES", "4096")
        build_dir, _ = export_model(bundled.transformer_dir, root, ["fp32", "int8"], model_id="tiny-dit",
                                    calibration=small_calibration(bundled), sampling=sampling_info(bundled))
        build_engines(build_dir, "ort", "cpu")
    return build_dir


def test_every_graph_and_engine_has_hashed_external_data(external_build):
    manifest = load_manifest(external_build)
    graphs = ["fp32/model.onnx", "int8/model.onnx", "int8/model.trt.onnx"]
    for graph in graphs:
        assert (external_build / f"{graph}.data").is_file(), graph
        inline = onnx.load(str(external_build / graph), load_external_data=False)
        # the graph file holds references, not weights (small Constant-node values stay inline)
        assert tensor_bytes(inline) < 0.02 * (external_build / f"{graph}.data").stat().st_size, graph
    recorded = {rel for entry in manifest.precisions.values() for rel, _ in entry.files()}
    assert {f"{g}.data" for g in graphs} <= recorded
    for key, engine in manifest.engines.items():
        assert list(engine.artifacts) == [f"{engine.path}.data"], key
        assert (external_build / f"{engine.path}.data").is_file()
    # the int8 TensorRT graph stays on its 16-bit base when its weights live outside it
    assert set(manifest.precisions["int8"].quantization["trt_compute_dtypes"]["MatMul"]) == {"float16"}


def test_check_and_run_pass_then_refuse_a_damaged_data_file_by_name(external_build, tmp_path):
    build = tmp_path / "tiny-dit"
    shutil.copytree(external_build, build)
    code, out, err = cli("check", build)
    assert code == 0, out + err
    code, _, err = cli("run", build, "--precision", "int8", "--steps", "2", "--class", "3", "--out", tmp_path / "a.png")
    assert code == 0, err
    data = build / "int8" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, out, _ = cli("check", build)
    assert code == 1 and "int8/model.onnx.data" in out and "sha256" in out, out
    engine = build / "int8" / "model.ort-cpu.onnx.data"
    engine.write_bytes(engine.read_bytes()[:-8])
    code, _, err = cli("run", build, "--precision", "int8", "--steps", "2", "--class", "3", "--out", tmp_path / "b.png")
    assert code != 0 and "model.ort-cpu.onnx.data" in err and len(err.strip().splitlines()) == 1, err


def test_threshold_and_weightless_copy(external_build, monkeypatch):
    monkeypatch.setenv("TMPDIFF_EXTERNAL_DATA_BYTES", "lots")
    with pytest.raises(TmpdiffError, match="TMPDIFF_EXTERNAL_DATA_BYTES"):
        external_data_threshold()
    monkeypatch.delenv("TMPDIFF_EXTERNAL_DATA_BYTES")
    model = onnx.load(str(external_build / "fp32" / "model.onnx"))  # weights read back from the .data file
    assert not is_large(model) and tensor_bytes(model) > 100_000
    structure = weightless(model)
    assert tensor_bytes(structure) < 0.01 * tensor_bytes(model) and len(structure.graph.node) == len(model.graph.node)
    assert [t.dims for t in structure.graph.initializer] == [t.dims for t in model.graph.initializer]
