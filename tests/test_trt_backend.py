"""Native TensorRT backend: CPU-side helpers and errors everywhere; real builds and runs on GPU machines only."""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tmpdiff.engines import trt as trt_backend
from tmpdiff.engines import trt_build
from tmpdiff.engines.trt import (
    CudaDevice,
    CudaStream,
    ProfileShape,
    SharedDeviceMemory,
    TrtBuildOptions,
    TrtEngine,
    build_trt_engine,
    check_engine_compatible,
    check_precision_supported,
    not_installed,
    parse_compute_capability,
    parse_version,
    plan_file_name,
    polygraphy_command,
    profile_shapes,
    trtexec_command,
)
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import EngineEntry, Manifest, PrecisionEntry, engine_problem
from tmpdiff.formats.precisions import PRECISIONS
from tmpdiff.formats.specs import TensorSpec

SPECS = [
    TensorSpec("hidden_states", "float32", ("batch", 4, 8, 8)),
    TensorSpec("timestep", "float32", ("batch",)),
    TensorSpec("class_labels", "int64", ("batch",)),
    TensorSpec("img_ids", "float32", (16, 3)),
]
L4 = CudaDevice(0, "NVIDIA L4", "8.9")


def _entry(**changes) -> EngineEntry:
    fields = dict(backend="trt", precision="fp8", path="fp8/engine_trt10.8.plan", sha256="0" * 64, source_sha256="1" * 64,
                  backend_version="10.8.0.43", device="cuda", compute_capability="8.9", build_flags={"gpu_name": "NVIDIA L4"})
    fields.update(changes)
    return EngineEntry(**fields)


def _tiny_onnx(path: Path, batch_axis: bool = True) -> Path:
    """y = x * 2 with x, y float32 (batch, 4)."""
    import onnx
    from onnx import TensorProto, helper

    dims = ["batch", 4] if batch_axis else [2, 4]
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])], "times_two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        initializer=[two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


TINY_SPECS = [TensorSpec("x", "float32", ("batch", 4))]
TINY_OUT = [TensorSpec("y", "float32", ("batch", 4))]


# --- plan names, profiles ---------------------------------------------------------------------------


def test_plan_file_name_carries_major_minor():
    assert plan_file_name("10.8.0.43") == "engine_trt10.8.plan"
    assert plan_file_name("10.16.1") == "engine_trt10.16.plan"
    with pytest.raises(TmpdiffError, match="not a TensorRT version"):
        plan_file_name("ten")


def test_static_profile_is_the_requested_batch():
    shapes = profile_shapes(SPECS, 2)
    assert shapes["hidden_states"] == ProfileShape((2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8))
    assert shapes["class_labels"] == ProfileShape((2,), (2,), (2,))
    assert shapes["img_ids"] == ProfileShape((16, 3), (16, 3), (16, 3))
    assert all(s.is_static for s in shapes.values())


def test_dynamic_profile_ranges_the_batch_axis_only():
    shapes = profile_shapes(SPECS, 2, dynamic=True, max_batch=8)
    assert shapes["hidden_states"] == ProfileShape((1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8))
    assert shapes["timestep"] == ProfileShape((1,), (2,), (8,))
    assert shapes["img_ids"].is_static
    assert profile_shapes(SPECS, 4, dynamic=True, min_batch=2)["timestep"] == ProfileShape((2,), (4,), (4,))


def test_profile_errors_are_clear():
    with pytest.raises(TmpdiffError, match="at least 1"):
        profile_shapes(SPECS, 0)
    with pytest.raises(TmpdiffError, match="min <= batch <= max"):
        profile_shapes(SPECS, 4, dynamic=True, max_batch=2)
    with pytest.raises(TmpdiffError, match="dynamic engines only"):
        profile_shapes(SPECS, 2, max_batch=8)
    tokens = [TensorSpec("tokens", "float32", ("batch", "seq", 8))]
    with pytest.raises(TmpdiffError, match="'seq'"):
        profile_shapes(tokens, 2)
    assert profile_shapes(tokens, 2, dims={"seq": 77})["tokens"].opt == (2, 77, 8)


# --- compatibility and precision checks ------------------------------------------------------------


def test_matching_engine_entry_passes():
    check_engine_compatible(_entry(), "b/fp8/engine_trt10.8.plan", "10.8.0.43", L4)


def test_version_mismatch_names_both_versions_and_the_fix():
    with pytest.raises(TmpdiffError) as info:
        check_engine_compatible(_entry(), "b/fp8/engine_trt10.8.plan", "10.9.0.34", L4)
    message = str(info.value)
    assert "engine_trt10.8.plan" in message and "10.8.0.43" in message and "10.9.0.34" in message
    assert "tmpdiff build --backend trt" in message
    assert "\n" not in message


def test_gpu_mismatch_names_both_gpus():
    h100 = CudaDevice(0, "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(TmpdiffError) as info:
        check_engine_compatible(_entry(), "b/fp8/engine_trt10.8.plan", "10.8.0.43", h100)
    message = str(info.value)
    assert "NVIDIA L4" in message and "8.9" in message and "H100" in message and "9.0" in message
    assert "tmpdiff build --backend trt" in message and "engine_trt10.8.plan" in message


def test_same_architecture_other_model_is_refused_unless_lenient():
    rtx4090 = CudaDevice(0, "NVIDIA GeForce RTX 4090", "8.9")
    with pytest.raises(TmpdiffError, match="RTX 4090"):
        check_engine_compatible(_entry(), "p.plan", "10.8.0.43", rtx4090)
    check_engine_compatible(_entry(), "p.plan", "10.8.0.43", rtx4090, strict_gpu_model=False)


def test_non_trt_entry_is_refused():
    with pytest.raises(TmpdiffError, match="not a TensorRT plan"):
        check_engine_compatible(_entry(backend="ort"), "p.plan", "10.8.0.43", L4)


@pytest.mark.parametrize(("precision", "refused", "accepted"), [
    ("fp8", "8.6", "8.9"),
    ("int4", "7.5", "8.0"),
    ("nvfp4", "9.0", "10.0"),
    ("fp16", "7.0", "7.5"),
])
def test_precision_needs_compute_capability(precision, refused, accepted):
    with pytest.raises(TmpdiffError) as info:
        check_precision_supported(precision, refused, "Some GPU")
    assert precision in str(info.value) and refused in str(info.value) and accepted in str(info.value)
    assert "Some GPU" in str(info.value)
    check_precision_supported(precision, accepted)
    check_precision_supported(precision, "12.0")


def test_unknown_precision_and_bad_capability_are_refused():
    with pytest.raises(TmpdiffError, match="unknown precision"):
        check_precision_supported("int3", "9.0")
    with pytest.raises(TmpdiffError, match="compute capability"):
        check_precision_supported("fp16", "sm89")


# --- equivalent command lines ----------------------------------------------------------------------


def test_trtexec_command_builds_the_same_engine(tmp_path):
    options = TrtBuildOptions(batch=2, dynamic=True, max_batch=8, optimization_level=4, workspace_bytes=1 << 30,
                              timing_cache=tmp_path / "timing.cache")
    shapes = profile_shapes(SPECS, 2, dynamic=True, max_batch=8)
    argv = shlex.split(trtexec_command("b/fp8/model.trt.onnx", "b/fp8/engine_trt10.8.plan", SPECS, shapes, options))
    assert argv[0] == "trtexec"
    assert "--onnx=b/fp8/model.trt.onnx" in argv and "--saveEngine=b/fp8/engine_trt10.8.plan" in argv
    assert "--stronglyTyped" in argv and "--skipInference" in argv and "--noTF32" in argv  # build clears TF32 too
    # img_ids is static: trtexec refuses explicit shapes for it.
    assert "--minShapes=hidden_states:1x4x8x8,timestep:1,class_labels:1" in argv
    assert "--optShapes=hidden_states:2x4x8x8,timestep:2,class_labels:2" in argv
    assert "--maxShapes=hidden_states:8x4x8x8,timestep:8,class_labels:8" in argv
    assert "--builderOptimizationLevel=4" in argv and "--profilingVerbosity=detailed" in argv  # as build sets it
    assert f"--memPoolSize=workspace:{1 << 30}B" in argv
    assert f"--timingCacheFile={tmp_path / 'timing.cache'}" in argv


def test_trtexec_command_static_graph_has_no_shape_flags():
    specs = [TensorSpec("x", "float32", (2, 4))]
    argv = shlex.split(trtexec_command("m.onnx", "e.plan", specs, profile_shapes(specs, 2), TrtBuildOptions(batch=2)))
    assert not any(a.startswith(("--minShapes", "--optShapes", "--maxShapes")) for a in argv)
    assert "--builderOptimizationLevel=3" in argv
    assert not any(a.startswith(("--memPoolSize", "--timingCacheFile")) for a in argv)


def test_trtexec_quotes_names_with_colons():
    specs = [TensorSpec("input:0", "float32", ("batch", 3))]
    argv = shlex.split(trtexec_command("m.onnx", "e.plan", specs, profile_shapes(specs, 1), TrtBuildOptions()))
    assert "--minShapes='input:0':1x3" in argv


def test_polygraphy_command_parses_to_the_same_profile(tmp_path):
    """Parse the generated command with polygraphy's own argument parser (no TensorRT needed)."""
    from polygraphy.tools.args.backend.trt.config import TrtConfigArgs
    from polygraphy.tools.convert import Convert

    cache = tmp_path / "timing.cache"
    options = TrtBuildOptions(batch=2, dynamic=True, max_batch=6, optimization_level=5, workspace_bytes=1 << 28,
                              timing_cache=cache)
    shapes = profile_shapes(SPECS, 2, dynamic=True, max_batch=6)
    argv = shlex.split(polygraphy_command("m.trt.onnx", "e.plan", SPECS, shapes, options))
    assert argv[:2] == ["polygraphy", "convert"]
    tool = Convert()
    args = tool.setup_parser().parse_args(argv[2:])
    tool.parse(args)
    config = tool.arg_groups[TrtConfigArgs]
    expected = {n: tuple(list(d) for d in shapes[n]) for n in ("hidden_states", "timestep", "class_labels")}
    assert config.profile_dicts == [expected]
    assert args.strongly_typed is True and args.convert_to == "trt" and args.output == "e.plan"
    assert config.builder_optimization_level == 5 and "DETAILED" in str(config.profiling_verbosity)
    assert list(config.memory_pool_limits.values()) == [1 << 28]
    assert args.load_timing_cache == str(cache) and args.save_timing_cache == str(cache)


# --- lazy import and the one clear error -----------------------------------------------------------


def test_import_does_not_need_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None\n"
            "import tmpdiff.engines.trt, tmpdiff.engines.trt_build\n"
            "assert sys.modules['tensorrt'] is None\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_missing_tensorrt_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ModuleNotFoundError
    onnx_path = _tiny_onnx(tmp_path / "fp32" / "model.onnx")
    with pytest.raises(TmpdiffError) as info:
        TrtEngine(tmp_path / "fp32" / "engine_trt10.8.plan")
    assert str(info.value) == not_installed()
    with pytest.raises(TmpdiffError) as info:
        build_trt_engine(onnx_path, tmp_path / "fp32", TINY_SPECS, profile_shapes(TINY_SPECS, 2), TrtBuildOptions(batch=2))
    assert str(info.value) == not_installed()
    with pytest.raises(TmpdiffError) as info:
        trt_backend.load_trt_engine(tmp_path, _entry(path="fp32/engine_trt10.8.plan"))
    assert str(info.value) == not_installed()


def test_stub_tensorrt_package_counts_as_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(TmpdiffError) as info:
        TrtEngine("anything.plan")
    assert str(info.value) == not_installed()


def test_no_gpu_is_one_clear_error(monkeypatch, tmp_path):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.8.0.43"
    fake.Builder = object
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    onnx_path = _tiny_onnx(tmp_path / "fp32" / "model.onnx")
    for make in (lambda: TrtEngine(tmp_path / "fp32" / "engine_trt10.8.plan"),
                 lambda: build_trt_engine(onnx_path, tmp_path / "fp32", TINY_SPECS, profile_shapes(TINY_SPECS, 1),
                                          TrtBuildOptions()),
                 CudaStream, SharedDeviceMemory):
        with pytest.raises(TmpdiffError, match="no NVIDIA GPU"):
            make()


def test_a_plan_with_fp8_io_is_refused_by_name():
    """An imported plan whose input is FP8 (or INT4, FP4): tmpdiff binds no such tensors, so the tensor and its type
    are named (was: a spec dtype "DataType.FP8" refused later in an unclear way)."""
    trt = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"))
    dtypes = {"hidden_states": types.SimpleNamespace(name="FP8"), "out": types.SimpleNamespace(name="FLOAT")}
    engine = types.SimpleNamespace(num_io_tensors=2, get_tensor_name=lambda i: list(dtypes)[i],
                                   get_tensor_dtype=dtypes.__getitem__, get_tensor_shape=lambda name: (-1, 4),
                                   get_tensor_mode=lambda name: "in" if name == "hidden_states" else "out")
    plan = object.__new__(TrtEngine)
    plan._trt, plan._engine, plan.path = trt, engine, Path("fp8/engine_trt10.16.plan")
    with pytest.raises(TmpdiffError, match="the plan's hidden_states is FP8: tmpdiff binds float32/16"):
        plan._io_specs()
    dtypes["hidden_states"] = types.SimpleNamespace(name="HALF")
    inputs, outputs = plan._io_specs()
    assert [(s.name, s.dtype) for s in inputs + outputs] == [("hidden_states", "float16"), ("out", "float32")]


def test_build_options_are_validated():
    with pytest.raises(TmpdiffError, match="0..5"):
        TrtBuildOptions(optimization_level=7)
    with pytest.raises(TmpdiffError, match="positive"):
        TrtBuildOptions(workspace_bytes=0)


def test_tiny_onnx_is_x_times_two(tmp_path):
    import onnxruntime as ort

    from tmpdiff.engines.ort import session_options  # valid whether or not a global thread pool exists

    path = _tiny_onnx(tmp_path / "m.onnx")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    (y,) = ort.InferenceSession(str(path), sess_options=session_options(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y, 2 * x)


# --- refusals that happen before TensorRT is touched ------------------------------------------------
# A bare stand-in module that load_tensorrt accepts (a version and a Builder attribute) but with no API at all:
# any call into TensorRT would raise AttributeError, so these tests show each refusal comes before one.


@pytest.fixture
def bare_trt(monkeypatch):
    bare = types.ModuleType("tensorrt")
    bare.__version__ = "10.8.0.43"
    bare.Builder = object
    monkeypatch.setitem(sys.modules, "tensorrt", bare)
    return bare


def _gpu(monkeypatch, gpu: CudaDevice) -> None:
    monkeypatch.setattr(trt_build, "cuda_device", lambda device=None: gpu)
    monkeypatch.setattr(trt_backend, "cuda_device", lambda device=None: gpu)


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_every_precision_needs_its_table_capability(precision):
    """check_precision_supported follows the precision table: the minimum passes, the GPU generation below refuses."""
    need = PRECISIONS[precision].min_compute_capability
    check_precision_supported(precision, f"{need[0]}.{need[1]}")
    below = f"{need[0]}.{need[1] - 1}" if need[1] else f"{need[0] - 1}.9"
    with pytest.raises(TmpdiffError, match=rf"{need[0]}\.{need[1]} or newer"):
        check_precision_supported(precision, below)


def test_version_and_capability_parsing():
    assert parse_version("10.8.0.43") == (10, 8) and parse_version(" 10.16.1") == (10, 16) and parse_version("11.0") == (11, 0)
    for bad in ("", "10", "v10.8", "ten.eight"):
        with pytest.raises(TmpdiffError, match="not a TensorRT version"):
            parse_version(bad)
    # compared as numbers, not strings: 10.0 is newer than 9.0, 8.10 than 8.9
    assert parse_compute_capability("10.0") > parse_compute_capability("9.0")
    assert parse_compute_capability("8.10") > parse_compute_capability("8.9")
    check_precision_supported("fp8", "8.10")
    check_precision_supported("nvfp4", "12.0")
    for bad in ("8", "8.9.1", "sm_89", "8,9"):
        with pytest.raises(TmpdiffError, match="not a compute capability"):
            parse_compute_capability(bad)


def test_build_refuses_a_precision_the_gpu_cannot_run(bare_trt, monkeypatch, tmp_path):
    _gpu(monkeypatch, CudaDevice(0, "NVIDIA A10", "8.6"))
    fp8 = _tiny_onnx(tmp_path / "fp8" / "model.trt.onnx")
    with pytest.raises(TmpdiffError, match="fp8 needs a GPU with compute capability 8.9 or newer .Ada or later.; NVIDIA A10 has 8.6"):
        build_trt_engine(fp8, tmp_path / "fp8", TINY_SPECS, profile_shapes(TINY_SPECS, 2), TrtBuildOptions(batch=2))
    with pytest.raises(TmpdiffError, match="ONNX file is missing"):  # int8 runs on 8.6; the graph is not there
        build_trt_engine(tmp_path / "int8" / "model.trt.onnx", tmp_path / "int8", TINY_SPECS, profile_shapes(TINY_SPECS, 2),
                         TrtBuildOptions(batch=2))
    assert not list(tmp_path.rglob("*.plan"))
    _gpu(monkeypatch, CudaDevice(0, "Tesla T4", "7.5"))  # int8 runs there, its bfloat16 base does not
    int8 = _tiny_onnx(tmp_path / "int8" / "model.trt.onnx")
    with pytest.raises(TmpdiffError, match="computes in bfloat16, which needs compute capability 8.0 .* Tesla T4 has 7.5"):
        build_trt_engine(int8, tmp_path / "int8", TINY_SPECS, profile_shapes(TINY_SPECS, 2), TrtBuildOptions(batch=2),
                         base="bfloat16")
    assert not list(tmp_path.rglob("*.plan"))


def test_plan_is_checked_against_its_manifest_entry_before_loading(bare_trt, monkeypatch, tmp_path):
    gpu = CudaDevice(0, "NVIDIA A10", "8.6")
    _gpu(monkeypatch, gpu)
    plan = tmp_path / "fp8" / "engine_trt10.8.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"plan bytes")
    digest = hashlib.sha256(b"plan bytes").hexdigest()
    entry = _entry(sha256=digest, compute_capability="8.6", build_flags={"gpu_name": "NVIDIA A10"})
    with pytest.raises(TmpdiffError, match="plan file is missing"):
        TrtEngine(tmp_path / "fp8" / "other.plan", entry)
    with pytest.raises(TmpdiffError, match="sha256"):
        TrtEngine(plan, entry.model_copy(update={"sha256": "0" * 64}))
    with pytest.raises(TmpdiffError, match="TensorRT 10.9.1.0, this is TensorRT 10.8.0.43"):
        TrtEngine(plan, entry.model_copy(update={"backend_version": "10.9.1.0"}))
    with pytest.raises(TmpdiffError, match="built for NVIDIA L4"):
        TrtEngine(plan, entry.model_copy(update={"compute_capability": "8.9", "build_flags": {"gpu_name": "NVIDIA L4"}}))
    # an entry that matches this GPU and TensorRT still cannot run fp8 on compute capability 8.6
    with pytest.raises(TmpdiffError, match="fp8 needs a GPU with compute capability 8.9"):
        TrtEngine(plan, entry)
    with pytest.raises(TmpdiffError, match="escapes the build directory"):
        trt_backend.load_trt_engine(tmp_path / "fp8", entry.model_copy(update={"path": "../outside.plan"}))


def test_manifest_freshness_uses_the_tensorrt_graph_hash(tmp_path):
    """A TensorRT engine is current when built from the trt:: graph (trt_sha256), an ORT engine from the twin."""
    plan = tmp_path / "fp8" / "engine_trt10.8.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"plan bytes")
    precision = PrecisionEntry(onnx="fp8/model.onnx", sha256="a" * 64, trt_onnx="fp8/model.trt.onnx", trt_sha256="b" * 64,
                               opset=19, key="k", parity_error=0.0, error_vs_fp32=0.01)
    manifest = Manifest(model_id="m", architecture="dit", model_sha256="c" * 64, denoiser_config={}, inputs=[], outputs=[],
                        precisions={"fp8": precision})
    entry = _entry(sha256=hashlib.sha256(b"plan bytes").hexdigest(), source_sha256="b" * 64)
    assert engine_problem(tmp_path, manifest, entry, backend_version="10.8.0.43", device="cuda") is None
    assert engine_problem(tmp_path, manifest, entry.model_copy(update={"source_sha256": "a" * 64})) == "built from an older export"
    assert "10.8.0.43, running 10.9" in engine_problem(tmp_path, manifest, entry, backend_version="10.9.0.34")
    assert "no longer exported" in engine_problem(tmp_path, manifest, entry.model_copy(update={"precision": "int4"}))
    plan.write_bytes(b"other bytes")
    assert "sha256" in engine_problem(tmp_path, manifest, entry)


def test_build_rebuilds_a_plan_made_for_another_gpu(bare_trt, monkeypatch, tmp_path):
    """A current plan built on an L4 is what loading refuses on an H100 (with "rebuild it"): `build` rebuilds it
    there instead of calling it up to date, and keeps it on the L4."""
    from tmpdiff.engines.build import build_engines
    from tmpdiff.formats.manifest import engine_key, save_manifest

    plan = tmp_path / "fp8" / "engine_trt10.8.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"plan bytes")
    precision = PrecisionEntry(onnx="fp8/model.onnx", sha256="a" * 64, trt_onnx="fp8/model.trt.onnx", trt_sha256="1" * 64,
                               opset=19, key="k", parity_error=0.0, error_vs_fp32=0.01)
    entry = _entry(sha256=hashlib.sha256(b"plan bytes").hexdigest())
    save_manifest(tmp_path, Manifest(model_id="m", architecture="dit", model_sha256="c" * 64, denoiser_config={}, inputs=[],
                                     outputs=[], precisions={"fp8": precision},
                                     engines={engine_key("trt", "cuda", "fp8"): entry}))
    progress: list[str] = []
    _gpu(monkeypatch, L4)
    assert build_engines(tmp_path, "trt", "cuda", ["fp8"], on_progress=progress.append)[0].skipped
    assert progress[-1] == "fp8: up to date"
    _gpu(monkeypatch, CudaDevice(0, "NVIDIA H100 80GB HBM3", "9.0"))
    with pytest.raises(TmpdiffError, match="TensorRT graph: file is missing"):  # it went on to build (there is no graph here)
        build_engines(tmp_path, "trt", "cuda", ["fp8"], on_progress=progress.append)
    assert ("fp8: rebuilding (plan built for NVIDIA L4 (compute capability 8.9), this GPU is NVIDIA H100 80GB HBM3 "
            "(compute capability 9.0))") in progress


def test_build_rebuilds_a_plan_made_with_other_options(bare_trt, monkeypatch, tmp_path):
    """`build` with another batch profile or optimization level rebuilds (it said "up to date" and kept the plan, so
    the rebuild a run's batch error asks for never happened); the same options keep it; an imported plan is kept."""
    from tmpdiff.engines.build import build_engines
    from tmpdiff.engines.trt_build import TrtBuildOptions, options_profile
    from tmpdiff.formats.manifest import TensorSpecModel, engine_key, save_manifest

    plan = tmp_path / "fp16" / "engine_trt10.8.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"plan bytes")
    inputs = [TensorSpecModel(name="x", dtype="float32", shape=["batch", 4])]
    built = TrtBuildOptions(batch=20)
    profile = {n: [list(s.min), list(s.opt), list(s.max)]
               for n, s in options_profile([i.spec() for i in inputs], built).items()}
    precision = PrecisionEntry(onnx="fp16/model.onnx", sha256="a" * 64, trt_onnx="fp16/model.trt.onnx",
                               trt_sha256="1" * 64, opset=19, key="k", parity_error=0.0, error_vs_fp32=0.01)

    def save(flags: dict) -> None:
        entry = _entry(precision="fp16", path="fp16/engine_trt10.8.plan", sha256=hashlib.sha256(b"plan bytes").hexdigest(),
                       build_flags={"gpu_name": L4.name, **flags})
        save_manifest(tmp_path, Manifest(model_id="m", architecture="dit", model_sha256="c" * 64, denoiser_config={},
                                         inputs=inputs, outputs=[], precisions={"fp16": precision},
                                         engines={engine_key("trt", "cuda", "fp16"): entry}))

    save({"profile": profile, "builder_optimization_level": 3, "dynamic": False, "tf32": False})
    _gpu(monkeypatch, L4)
    progress: list[str] = []
    assert build_engines(tmp_path, "trt", "cuda", ["fp16"], trt_options=built, on_progress=progress.append)[0].skipped
    for other, why in ((TrtBuildOptions(batch=2), "built for shapes batch 20, asked for batch 2"),
                       (TrtBuildOptions(batch=20, dynamic=True, max_batch=40), "asked for batch 1..20..40"),
                       (TrtBuildOptions(batch=20, optimization_level=5), "built at optimization level 3, asked for 5")):
        with pytest.raises(TmpdiffError, match="TensorRT graph: file is missing"):  # it went on to build
            build_engines(tmp_path, "trt", "cuda", ["fp16"], trt_options=other, on_progress=progress.append)
        assert any(line.startswith("fp16: rebuilding (") and why in line for line in progress), (why, progress)
    save({"profile": profile, "builder_optimization_level": 3, "dynamic": False})  # built before TF32 was cleared
    with pytest.raises(TmpdiffError, match="TensorRT graph: file is missing"):
        build_engines(tmp_path, "trt", "cuda", ["fp16"], trt_options=built, on_progress=progress.append)
    assert progress[-1] == "fp16: rebuilding (built with TF32 on)"  # refused before "building"
    save({"imported_from": "/elsewhere/fp16.plan"})
    assert build_engines(tmp_path, "trt", "cuda", ["fp16"], trt_options=TrtBuildOptions(batch=2))[0].skipped


def test_a_plan_is_never_written_outside_the_build(bare_trt, monkeypatch, tmp_path):
    """A manifest whose TensorRT graph path leaves the build directory: build and import refuse before writing (the
    plan went into the graph's folder, outside the build)."""
    from tmpdiff.engines.build import build_engines, import_trt_plan
    from tmpdiff.formats.manifest import TensorSpecModel, save_manifest

    build = tmp_path / "build"
    precision = PrecisionEntry(onnx="fp16/model.onnx", sha256="a" * 64, trt_onnx="../escape/model.trt.onnx",
                               trt_sha256="1" * 64, opset=19, key="k", parity_error=0.0, error_vs_fp32=0.01)
    save_manifest(build, Manifest(model_id="m", architecture="dit", model_sha256="c" * 64, denoiser_config={},
                                  inputs=[TensorSpecModel(name="x", dtype="float32", shape=["batch", 4])], outputs=[],
                                  precisions={"fp16": precision}))
    _tiny_onnx(tmp_path / "escape" / "model.trt.onnx")
    _gpu(monkeypatch, L4)
    with pytest.raises(TmpdiffError, match="TensorRT graph: path escapes the build directory"):
        build_engines(build, "trt", "cuda", ["fp16"])
    plan = tmp_path / "given.plan"
    plan.write_bytes(b"plan bytes")
    monkeypatch.setattr("tmpdiff.engines.trt.TrtEngine", _FakeLoadedPlan)
    with pytest.raises(TmpdiffError, match="outside the build directory"):
        import_trt_plan(build, "fp16", plan)
    assert sorted(p.name for p in (tmp_path / "escape").iterdir()) == ["model.trt.onnx"]


class _FakeLoadedPlan:
    """A deserialised plan as import_trt_plan sees it (no TensorRT here)."""

    def __init__(self, *args, **kwargs) -> None:
        self.gpu = L4

    def close(self) -> None:
        pass


# --- GPU: real builds and runs ---------------------------------------------------------------------


def _gpu_ready() -> bool:
    try:
        import tensorrt

        return hasattr(tensorrt, "Builder") and torch.cuda.is_available()
    except Exception:
        return False


needs_gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs TensorRT and an NVIDIA GPU")


def _build(tmp_path: Path, **options) -> tuple[Path, EngineEntry]:
    onnx_path = _tiny_onnx(tmp_path / "fp32" / "model.onnx")
    opts = TrtBuildOptions(**options)
    entry = build_trt_engine(onnx_path, tmp_path / "fp32", TINY_SPECS, trt_backend.options_profile(TINY_SPECS, opts), opts)
    return tmp_path / entry.path, entry


def _buffers(batch: int, seed: float = 0.0) -> tuple[dict, dict]:
    x = (torch.arange(batch * 4, dtype=torch.float32, device="cuda").reshape(batch, 4) + seed).contiguous()
    return {"x": x}, {"y": torch.empty(batch, 4, device="cuda")}


@pytest.mark.gpu
@needs_gpu
def test_build_writes_versioned_plan_and_entry(tmp_path):
    import tensorrt

    plan, entry = _build(tmp_path, batch=2, timing_cache=tmp_path / "timing.cache")
    assert plan.name == plan_file_name(tensorrt.__version__) and plan.parent.name == "fp32"
    assert entry.path == f"fp32/{plan.name}" and entry.backend == "trt" and entry.precision == "fp32"
    assert entry.sha256 == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert entry.source_sha256 == hashlib.sha256((tmp_path / "fp32" / "model.onnx").read_bytes()).hexdigest()
    assert entry.backend_version == tensorrt.__version__
    major, minor = torch.cuda.get_device_capability()
    assert entry.compute_capability == f"{major}.{minor}"
    assert entry.build_flags["gpu_name"] == torch.cuda.get_device_name()
    assert entry.build_flags["strongly_typed"] is True and entry.build_flags["tf32"] is False
    assert (tmp_path / "timing.cache").stat().st_size > 0
    assert not list((tmp_path / "fp32").glob(".*.tmp"))


@pytest.mark.gpu
@needs_gpu
def test_static_engine_runs_and_refuses_other_batches(tmp_path):
    plan, entry = _build(tmp_path, batch=2)
    stream = CudaStream()
    with TrtEngine(plan, entry, input_specs=TINY_SPECS, output_specs=TINY_OUT) as engine:
        inputs, outputs = _buffers(2)
        engine.bind(inputs, outputs)
        engine.run(stream)
        stream.synchronize()
        torch.testing.assert_close(outputs["y"], 2 * inputs["x"])
        with pytest.raises(TmpdiffError, match="outside the engine's profile"):
            engine.bind(*_buffers(3))


@pytest.mark.gpu
@needs_gpu
def test_dynamic_engine_accepts_the_batch_range(tmp_path):
    plan, entry = _build(tmp_path, batch=2, dynamic=True, max_batch=4)
    stream = CudaStream()
    with TrtEngine(plan, entry) as engine:
        for batch in (1, 3, 4):
            inputs, outputs = _buffers(batch)
            engine.bind(inputs, outputs)
            engine.run(stream)
            stream.synchronize()
            torch.testing.assert_close(outputs["y"], 2 * inputs["x"])
        with pytest.raises(TmpdiffError, match="outside the engine's profile"):
            engine.bind(*_buffers(5))


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_replay_equals_plain_run(tmp_path):
    plan, entry = _build(tmp_path, batch=2)
    stream = CudaStream()
    memory = SharedDeviceMemory()
    plain = TrtEngine(plan, entry, memory=memory)
    graphed = TrtEngine(plan, entry, memory=memory, cuda_graph=True)
    inputs, out_plain = _buffers(2)
    out_graph = {"y": torch.empty_like(out_plain["y"])}
    plain.bind(inputs, out_plain)
    graphed.bind(inputs, out_graph)
    for _ in range(4):
        with torch.cuda.stream(stream.torch):
            inputs["x"].copy_(torch.randn(2, 4, device="cuda"))  # replay must read the new input values
        plain.run(stream)
        graphed.run(stream)
        stream.synchronize()
        torch.testing.assert_close(out_graph["y"], out_plain["y"])
        torch.testing.assert_close(out_plain["y"], 2 * inputs["x"])
        assert graphed._graph is not None  # captured after the first run, replayed from the second
    assert memory.size >= max(plain.device_memory_size, graphed.device_memory_size)
    plain.close()
    graphed.close()
    memory.close()


@pytest.mark.gpu
@needs_gpu
def test_a_dynamic_plan_captures_a_graph_per_binding_and_unbind_keeps_it_loaded(tmp_path):
    """A graph bakes in shapes and addresses: each bind drops it and the next runs capture one at the new batch.
    `unbind` (what closing one of several runners sharing the engine does) leaves the plan loaded for the others."""
    plan, entry = _build(tmp_path, batch=2, dynamic=True, max_batch=4)
    stream = CudaStream()
    with TrtEngine(plan, entry, cuda_graph=True) as engine:
        for batch in (2, 4, 2):
            inputs, outputs = _buffers(batch)
            engine.bind(inputs, outputs)
            for _ in range(2):
                engine.run(stream)
            stream.synchronize()
            assert engine.graph_active
            torch.testing.assert_close(outputs["y"], 2 * inputs["x"])
            engine.unbind()
            assert not engine.graph_active
        inputs, outputs = _buffers(3)
        engine.bind(inputs, outputs)
        engine.run(stream)
        stream.synchronize()
        torch.testing.assert_close(outputs["y"], 2 * inputs["x"])


@pytest.mark.gpu
@needs_gpu
def test_manifest_engines_share_the_default_device_memory(tmp_path):
    _, static_entry = _build(tmp_path / "a", batch=2)
    _, dynamic_entry = _build(tmp_path / "b", batch=2, dynamic=True, max_batch=8)
    first = trt_backend.load_trt_engine(tmp_path / "a", static_entry)
    second = trt_backend.load_trt_engine(tmp_path / "b", dynamic_entry)
    memory = trt_backend.default_device_memory()
    assert first._memory is memory and second._memory is memory
    assert memory.size >= max(first.device_memory_size, second.device_memory_size)
    stream = CudaStream()
    for engine in (first, second):
        inputs, outputs = _buffers(2)
        engine.bind(inputs, outputs)
        engine.run(stream)
        stream.synchronize()
        torch.testing.assert_close(outputs["y"], 2 * inputs["x"])
    first.close()
    assert memory.size > 0  # still held by the second engine
    second.close()
    assert memory.size == 0  # the last engine to close frees the default allocation


@pytest.mark.gpu
@needs_gpu
def test_corrupt_plan_and_bad_graph_are_clear_errors(tmp_path):
    plan, entry = _build(tmp_path, batch=2)
    plan.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
    with pytest.raises(TmpdiffError, match="sha256"):
        TrtEngine(plan, entry)
    with pytest.raises(TmpdiffError) as info:
        TrtEngine(plan, entry, verify_sha256=False)
    assert "deserialize" in str(info.value) and "tmpdiff build --backend trt" in str(info.value)
    assert str(plan) in str(info.value)
    broken = tmp_path / "fp32" / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(TmpdiffError) as info:
        build_trt_engine(broken, tmp_path / "fp32", TINY_SPECS, profile_shapes(TINY_SPECS, 2), TrtBuildOptions(batch=2))
    assert str(broken) in str(info.value)


@pytest.mark.gpu
@needs_gpu
def test_version_mismatch_is_refused_before_loading(tmp_path):
    plan, entry = _build(tmp_path, batch=2)
    with pytest.raises(TmpdiffError, match="tmpdiff build --backend trt"):
        TrtEngine(plan, entry.model_copy(update={"backend_version": "10.0.0.0"}))
