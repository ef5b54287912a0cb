"""The large-model path (graphs whose weights go to external `.data` files), forced on the bundled model by lowering
the threshold: export, build, check and run all see the `.data` files, hash them, and refuse a damaged one by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
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


def test_export_refuses_up_front_when_the_planned_peak_does_not_fit(bundled, tmp_path, monkeypatch):
    """The plan counts parameters from safetensors headers (no weights read) and refuses with the numbers."""
    from tmpdiff.export import memory_plan
    from tmpdiff.formats.precisions import get_precision
    from tmpdiff.models.loading import load_diffusers_model

    params = memory_plan.parameter_count(bundled.transformer_dir)
    assert params == sum(p.numel() for p in load_diffusers_model(bundled.transformer_dir).parameters())
    plans = memory_plan.plan_export(bundled.transformer_dir, [get_precision("fp32"), get_precision("int8")])
    # a quantized export frees the torch model once traced, so its planned peak is below the fp32 export's
    assert plans[0].peak_bytes > plans[1].peak_bytes > memory_plan.BASE_BYTES
    monkeypatch.setattr(memory_plan.engine_memory, "available_bytes", lambda: int(memory_plan.BASE_BYTES))
    code, _, err = cli("export", bundled.transformer_dir, "--out", tmp_path, "--precisions", "fp32,int8")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "not enough memory to export: fp32 needs about" in lines[0], err
    assert "GB is available" in lines[0] and "--no-memory-check" in lines[0]
    assert not any(tmp_path.iterdir())  # refused before anything was created


def test_free_space_is_summed_over_what_shares_a_filesystem(tmp_path, monkeypatch):
    from tmpdiff.formats import disk_space

    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 10 * disk_space.GB)
    disk_space.require_free_space([(tmp_path / "not-made-yet" / "build", 6 * disk_space.GB, "graphs")], "a write")
    with pytest.raises(TmpdiffError, match=r"graphs \+ scratch need about 12.0 GB on the filesystem of .*10.0 GB is "
                                           r"free; try elsewhere"):
        disk_space.require_free_space([(tmp_path / "build", 6 * disk_space.GB, "graphs"),
                                       (tmp_path / "scratch", 6 * disk_space.GB, "scratch")], "a write", "try elsewhere")


def test_export_and_build_refuse_a_full_disk_before_their_work(bundled, tmp_path, monkeypatch):
    """Planned bytes against free bytes per precision / engine: one line naming what does not fit, nothing written."""
    from tmpdiff.export import disk_plan
    from tmpdiff.export.memory_plan import parameter_count
    from tmpdiff.formats import disk_space
    from tmpdiff.formats.precisions import get_precision

    params = parameter_count(bundled.transformer_dir)
    assert disk_plan.written_bytes(get_precision("int8"), params, "float32", 0.0) < disk_plan.written_bytes(
        get_precision("fp32"), params, "float32", 0.0)
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 1000)
    code, _, err = cli("export", bundled.transformer_dir, "--out", tmp_path, "--precisions", "fp32")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, err
    assert "not enough disk space for the fp32 export" in lines[0] and "fp32's graphs" in lines[0], err
    assert "GB is free" in lines[0] and "--no-memory-check" in lines[0]
    assert not list(tmp_path.rglob("*.onnx*"))
    code, _, err = cli("export", bundled.transformer_dir, "--out", tmp_path, "--precisions", "fp32", "--model-id",
                       "tiny-dit", "--no-memory-check")  # the override skips the plan
    assert code == 0, err
    build_dir = tmp_path / "tiny-dit"
    code, _, err = cli("build", build_dir, "--backend", "ort")
    lines = err.strip().splitlines()
    assert code != 0 and "not enough disk space for building the fp32 engine" in lines[-1], err
    assert not (build_dir / "fp32" / "model.ort-cpu.onnx").exists() and not load_manifest(build_dir).engines


def test_a_16_bit_export_loads_the_model_in_16_bits_when_fp32_would_not_fit(bundled, tmp_path, monkeypatch):
    from tmpdiff.export import memory_plan
    from tmpdiff.formats.precisions import get_precision

    fp16 = [get_precision("fp16")]
    fp32_plan = memory_plan.plan_export(bundled.transformer_dir, fp16)[0].peak_bytes
    half_plan = memory_plan.plan_export(bundled.transformer_dir, fp16, "float16")[0].peak_bytes
    between = int((fp32_plan + half_plan) / 2)
    assert memory_plan.choose_base(bundled.transformer_dir, fp16, available=int(fp32_plan) + 1) == "float32"
    assert memory_plan.choose_base(bundled.transformer_dir, fp16, available=between) == "float16"
    # quantized precisions are made from the 16-bit load too; fp32 cannot be, and the refusal says what would fit
    int8 = get_precision("int8")
    assert memory_plan.choose_base(bundled.transformer_dir, [*fp16, int8], available=between) == "float16"
    with pytest.raises(TmpdiffError, match="--precisions fp16,int8 fits from the 16-bit model"):
        memory_plan.choose_base(bundled.transformer_dir, [get_precision("fp32"), *fp16, int8], available=between)
    with pytest.raises(TmpdiffError, match="fp32 cannot be exported from a model loaded in float16"):
        memory_plan.choose_base(bundled.transformer_dir, [get_precision("fp32")], requested="float16")
    monkeypatch.setattr(memory_plan.engine_memory, "available_bytes", lambda: between)
    build_dir, outcomes = export_model(bundled.transformer_dir, tmp_path, ["fp16"], model_id="half")
    entry = load_manifest(build_dir).precisions["fp16"]
    # checked against the 16-bit torch model it was traced from: the same figure twice, and no fp32 torch error
    assert entry.parity_error == entry.error_vs_fp32 and entry.torch_error_vs_fp32 == 0.0
    assert entry.parity_error < get_precision("fp16").parity_tolerance



def test_an_up_to_date_export_does_not_depend_on_the_memory_free(bundled, tmp_path, monkeypatch):
    """`--load-dtype auto` keeps the dtype the build's entries were made from: with less memory free later, the same
    export is up to date (not redone from a 16-bit load, not refused); a new precision is planned on that dtype."""
    from tmpdiff.export import memory_plan
    from tmpdiff.formats.precisions import get_precision

    fp16 = [get_precision("fp16")]
    fp32_plan = memory_plan.plan_export(bundled.transformer_dir, fp16)[0].peak_bytes
    half_plan = memory_plan.plan_export(bundled.transformer_dir, fp16, "float16")[0].peak_bytes
    build_dir, _ = export_model(bundled.transformer_dir, tmp_path, ["fp16"], model_id="m")
    assert load_manifest(build_dir).precisions["fp16"].reference_dtype == "float32"
    for free in (int((fp32_plan + half_plan) / 2), 1):  # float16 would fit, nothing fits
        monkeypatch.setattr(memory_plan.engine_memory, "available_bytes", lambda free=free: free)
        _, outcomes = export_model(bundled.transformer_dir, tmp_path, ["fp16"], model_id="m")
        assert [o.skipped for o in outcomes] == [True]
        assert load_manifest(build_dir).precisions["fp16"].reference_dtype == "float32"
    with pytest.raises(TmpdiffError, match="not enough memory to export: fp32 needs about"):
        export_model(bundled.transformer_dir, tmp_path, ["fp16", "fp32"], model_id="m")
    assert set(load_manifest(build_dir).precisions) == {"fp16"}

def test_quantized_precisions_are_made_from_a_model_loaded_in_16_bits(bundled, tmp_path, quant_build):
    """`--load-dtype float16` (what a model too large for fp32 gets): modelopt calibrates the 16-bit model, its
    graphs keep its 16-bit weights, and the int8 engine is as close to the fp32 model as the one made from fp32."""
    from safetensors.numpy import load_file

    from tmpdiff.formats.manifest import CHECK_IO_NAME

    code, out, err = cli("export", bundled.transformer_dir, "--out", tmp_path, "--precisions", "fp16,int8",
                         "--load-dtype", "float16", "--model-id", "half", "--calib-classes", "0,1,2,3,4,5,6,7,8,9",
                         "--calib-seeds", "0")
    assert code == 0, err
    assert "vs float16" in out  # the export table names the reference
    build_dir = tmp_path / "half"
    manifest = load_manifest(build_dir)
    assert {e.reference_dtype for e in manifest.precisions.values()} == {"float16"}
    assert json.loads((build_dir / "manifest.json").read_text())["format"] == "tmpdiff.manifest/4"
    twin = onnx.load(build_dir / "int8" / "model.onnx")
    types = {t.data_type for t in twin.graph.initializer}
    # int8 GEMM weights; the rest in fp32 (`export.upcast`: what ONNX Runtime's CPU kernels compute in anyway)
    assert onnx.TensorProto.INT8 in types and onnx.TensorProto.FLOAT16 not in types
    trt = onnx.load(build_dir / "int8" / "model.trt.onnx")  # the TensorRT graph keeps the model's 16 bits
    assert {onnx.TensorProto.INT8, onnx.TensorProto.FLOAT16} <= {t.data_type for t in trt.graph.initializer}
    code, _, err = cli("build", build_dir)
    assert code == 0, err
    code, out, err = cli("check", build_dir)  # each engine vs the fp16 engine, against the recorded error
    assert code == 0, out + err

    _, fp32_dir, _ = quant_build
    def check_output(directory, precision):
        return next(v for k, v in load_file(directory / precision / CHECK_IO_NAME).items() if k.startswith("output."))
    fp32 = check_output(fp32_dir, "fp32")
    def error(output):
        return float(np.linalg.norm(output - fp32) / np.linalg.norm(fp32))
    from_fp32, from_fp16 = error(check_output(fp32_dir, "int8")), error(check_output(build_dir, "int8"))
    assert from_fp16 <= 1.5 * from_fp32, (from_fp16, from_fp32)


def test_the_int4_plan_follows_the_share_of_convolution_kernels(tmp_path):
    """int4 is W4A16 (GEMMs only): its graphs hold convolution kernels at the twin's fp32 and GEMM weights at half a
    byte, so its planned extra over a quantized export follows the weights' convolution share, read from the
    safetensors headers (a 3-d positional table is no kernel); a model of GEMMs alone is planned like its int8, plus
    the least extra measured."""
    import torch
    from safetensors.torch import save_file

    from tmpdiff.export import memory_plan
    from tmpdiff.formats.precisions import get_precision

    linear_only, with_convs = tmp_path / "transformer", tmp_path / "unet"
    for directory in (linear_only, with_convs):
        directory.mkdir()
    save_file({"blocks.0.attn.to_q.weight": torch.zeros(64, 64), "pos_embed.pos_embed": torch.zeros(1, 32, 64)},
              str(linear_only / "diffusion_pytorch_model.safetensors"))
    save_file({"blocks.0.attn.to_q.weight": torch.zeros(64, 64), "conv_in.weight": torch.zeros(64, 16, 2, 2),
               "conv_in.bias": torch.zeros(64)}, str(with_convs / "diffusion_pytorch_model.safetensors"))
    assert memory_plan.conv_fraction(linear_only) == 0.0
    assert memory_plan.conv_fraction(with_convs) == pytest.approx(4096 / (4096 + 4096 + 64))
    specs = [get_precision("int8"), get_precision("int4")]
    for base in ("float32", "float16"):
        int8, int4 = memory_plan.plan_export(linear_only, specs, base)
        # no kernels: planned like the int8 export, plus the least extra the SDXL-size UNet showed from 16 bits
        assert int4.copies == pytest.approx(int8.copies + memory_plan.INT4_MIN_EXTRA[base])
        int8, int4 = memory_plan.plan_export(with_convs, specs, base)
        share = memory_plan.conv_fraction(with_convs)
        extra = memory_plan.INT4_GRAPH_COPIES * (3 * share - 0.5 * (1 - share)) / memory_plan.BYTES_PER_WEIGHT[base]
        assert int4.copies == pytest.approx(int8.copies + max(memory_plan.INT4_MIN_EXTRA[base], extra))
        assert int4.copies > int8.copies and f"{int4.copies:.1f} x the" in int4.describe()
    # the disk an int4 export writes follows the same share: kernels at fp32 (twin) + 16 bits (TensorRT graph)
    from tmpdiff.export import disk_plan

    n, int4 = memory_plan.parameter_count(with_convs), get_precision("int4")
    for base in ("float32", "float16"):
        assert disk_plan.written_bytes(int4, n, base, 0.0) == pytest.approx(disk_plan.INT4_OTHER_BYTES * n)
        assert disk_plan.written_bytes(int4, n, base, share) == pytest.approx(
            (disk_plan.INT4_KERNEL_BYTES * share + disk_plan.INT4_OTHER_BYTES * (1 - share)) * n)


# each real model's share of convolution kernels, `memory_plan.conv_fraction` of its safetensors headers
REAL_CONV_SHARES = {"sd15-unet": 0.685, "sdxl-unet": 0.130, "pixart-sigma": 0.0, "sd3-medium": 0.0}


def test_the_disk_plan_covers_every_export_bench_scale_measured():
    """Every graph-file total `scripts/bench_scale.py` recorded (results/cpu-*-2core/scale.json) is at most what the
    plan says that export writes (1% for the graph protos beside the weights)."""
    from tmpdiff.export import disk_plan
    from tmpdiff.formats.precisions import get_precision

    checked = 0
    for path in sorted(Path(__file__).parents[1].glob("results/cpu-*-2core/scale.json")):
        for name, model in json.loads(path.read_text())["models"].items():
            for precision, row in model["precisions"].items():
                written = sum(row.get("graph_files", {}).values())
                if not written:
                    continue
                planned = disk_plan.written_bytes(get_precision(precision), model["parameters"],
                                                  model["weights_dtype"] if precision != "fp32" else "float32",
                                                  REAL_CONV_SHARES[name])
                assert written <= 1.01 * planned, (path, name, precision, written / model["parameters"])
                checked += 1
    assert checked >= 15  # both machines' records: fp32, fp16, int8, fp8 and int4 exports


def test_collections_during_an_export_skip_what_existed_before_it():
    """An export's six collections walk only what it made (a model, a graph): objects from before are frozen until the
    outermost use ends, and garbage made inside is still collected."""
    import gc
    import weakref

    from tmpdiff.engines.memory import collecting_new_objects_only

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    with collecting_new_objects_only():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with collecting_new_objects_only():
            cycle = Node()
            cycle.self = cycle
            alive = weakref.ref(cycle)
            del cycle
            gc.collect()
            assert alive() is None
        assert gc.get_freeze_count() == frozen  # the inner use left the outer one's freeze alone
    assert gc.get_freeze_count() == 0


def test_an_engine_is_stale_when_only_its_graphs_external_data_changed(external_build, tmp_path):
    """A re-export can change the weights in `model.onnx.data` and leave the graph file byte for byte the same (the
    same tensors, at the same offsets): the engine built from the old weights is then not current."""
    from tmpdiff.engines.ort_build import engine_state
    from tmpdiff.formats.atomic import sha256_file
    from tmpdiff.formats.manifest import engine_key, save_manifest

    build = tmp_path / "tiny-dit"
    shutil.copytree(external_build, build)
    manifest = load_manifest(build)
    engine = manifest.engines[engine_key("ort", "cpu", "fp32")]
    assert engine_state(build, manifest, engine) is None
    data = build / "fp32" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # other weights, as a re-export would write them; the graph file untouched
    data.write_bytes(bytes(raw))
    manifest.precisions["fp32"].artifacts["fp32/model.onnx.data"] = sha256_file(data)
    save_manifest(build, manifest)
    assert engine_state(build, load_manifest(build), engine) == "built from an older export"
