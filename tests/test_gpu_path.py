"""The GPU path's CPU-checkable parts: one backend/device rule, batch vs plan profiles, TensorRT EP options, and the
GPU check stopping cleanly on a machine without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import cli
from tmpdiff.engines.loading import check_batch
from tmpdiff.engines.ort_build import trt_ep_options
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import EngineEntry, load_manifest

REPO = Path(__file__).resolve().parents[1]


def _with_trt_plan(manifest, batch: tuple[int, int, int]):
    """The manifest as if a TensorRT int8 plan with this batch profile had been built."""
    profile = {s.name: [[b, *[d for d in s.shape[1:]]] for b in batch] for s in manifest.inputs}
    manifest.engines["trt:cuda:int8"] = EngineEntry(
        backend="trt", precision="int8", path="int8/engine_trt10.16.plan", sha256="0", source_sha256="0",
        backend_version="10.16", device="cuda", compute_capability="9.0", build_flags={"profile": profile})
    return manifest


def test_a_batch_outside_the_plan_profile_is_refused_with_the_rebuild(quant_build):
    _, build_dir, _ = quant_build
    static = _with_trt_plan(load_manifest(build_dir), (20, 20, 20))
    check_batch(static, build_dir, "trt", "cuda", 20)
    with pytest.raises(TmpdiffError, match=r"needs 4 batch rows.*built for batch 20.*--backend trt --batch 4"):
        check_batch(static, build_dir, "trt", "cuda", 4)
    dynamic = _with_trt_plan(load_manifest(build_dir), (1, 20, 40))
    check_batch(dynamic, build_dir, "trt", "cuda", 33)
    with pytest.raises(TmpdiffError, match="batches 1..40"):
        check_batch(dynamic, build_dir, "trt", "cuda", 41)
    check_batch(static, build_dir, "ort", "cpu", 4)  # ORT graphs take any batch


def test_one_backend_device_rule_for_every_command(quant_build, tmp_path):
    _, build_dir, _ = quant_build
    for command in (["run", build_dir, "--precision", "fp32", "--out", tmp_path / "x.png"],
                    ["profile", build_dir, "--out", tmp_path / "c.json"],
                    ["build", build_dir]):
        code, _, err = cli(*command, "--backend", "trt", "--device", "cpu")
        assert code == 2 and "--backend trt runs on cuda" in err, err
        code, _, err = cli(*command, "--backend", "tensorrt")
        assert code == 2 and "'tensorrt' is not one of 'ort', 'trt'" in err and len(err.strip().splitlines()) == 1, err


def test_trt_ep_keeps_its_caches_in_the_build_dir_with_profile_shapes(quant_build):
    _, build_dir, _ = quant_build
    manifest = load_manifest(build_dir)
    options = trt_ep_options(build_dir, "int8", manifest, batch=(2, 8, 16))
    assert Path(options["trt_engine_cache_path"]).is_relative_to(build_dir)
    assert options["trt_profile_min_shapes"].startswith("hidden_states:2x1x16x16")
    assert "timestep:16" in options["trt_profile_max_shapes"] and options["trt_int8_enable"] == "True"
    assert "trt_int8_enable" not in trt_ep_options(build_dir, "fp8", manifest)
    assert options["trt_fp16_enable"] == "True" and "trt_fp16_enable" not in trt_ep_options(build_dir, "fp32", manifest)


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is not None,
                    reason="this checks the no-GPU exit of a machine without TensorRT")
def test_gpu_check_stops_with_one_line_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TMPDIFF_GPU_INSTALL"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors == ["error: no NVIDIA GPU visible to torch (torch.cuda.is_available() is False): the GPU checks need one"]
    assert "tensorrt" in done.stdout and "missing: TensorRT is not installed" in done.stdout


@pytest.mark.skipif(torch.version.cuda is not None, reason="this checks the install refusal of a CPU torch")
def test_gpu_install_refuses_a_cpu_torch_before_installing_anything():
    """TMPDIFF_GPU_INSTALL=1 with a CPU build of torch: no TensorRT wheel fits it, so the script stops in one line
    before pip runs (it installed the CUDA 13 TensorRT metapackage and then failed)."""
    env = {**os.environ, "TMPDIFF_GPU_INSTALL": "1"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "torch here is a CPU build: install a CUDA 12 or 13 build of torch 2.13.0" in errors[0]
    assert importlib.util.find_spec("tensorrt") is None


def test_a_gpu_batch_is_checked_against_the_gpus_free_memory(quant_build, monkeypatch):
    """TensorRT's and ORT-CUDA's rows live on the GPU: a batch is refused by the GPU's free memory, not the host's."""
    from tmpdiff.engines.memory import bytes_per_row, check_fits

    _, build_dir, _ = quant_build
    manifest = load_manifest(build_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 16 * 2**30))  # 1 MiB free
    rows = 2**20 // bytes_per_row(manifest, "trt", "cuda")[0] + 1
    for backend, device in (("trt", "cuda"), ("ort", "cuda")):
        with pytest.raises(TmpdiffError, match=f"{rows} batch rows need .* 0.00 GiB is free on the GPU"):
            check_fits(manifest, rows, backend, device)
    check_fits(manifest, rows, "ort", "cpu")  # the host has room for them


def test_the_gpu_check_builds_for_tensorrt_only_what_the_gpu_runs(monkeypatch, tmp_path):
    """On a GPU before Ada (an A10, 8.6) the check exports all five precisions but asks TensorRT for fp8 nowhere (its
    build refused fp8 and stopped the whole check at its first step); the kernel check names fp8 as not on this GPU."""
    from tmpdiff.commands import doctor
    from tmpdiff.commands import export as export_command
    from tmpdiff.engines import build as build_module
    from tmpdiff.engines import trt as trt_module
    from tmpdiff.engines import trt_build
    from tmpdiff.export import exporter

    calls: list[tuple] = []
    options: list = []

    def build_engines(build_dir, backend, device, precisions=None, trt_options=None, **_):
        calls.append((backend, precisions))
        options.append(trt_options)
        return [build_module.BuildOutcome(p, build_dir / p, skipped=False) for p in precisions or []]

    monkeypatch.setattr(export_command, "calibration_for", lambda *_: (None, None))
    monkeypatch.setattr(export_command, "resolve_model_dir", lambda *_: tmp_path)
    monkeypatch.setattr(exporter, "export_model", lambda _dir, _out, precisions, **__: calls.append(("export", precisions)))
    monkeypatch.setattr(build_module, "build_engines", build_engines)
    monkeypatch.setattr(trt_build, "cuda_device", lambda device=None: trt_build.CudaDevice(0, "NVIDIA A10", "8.6"))
    monkeypatch.setattr(trt_module, "inspect_layers", lambda _dir, precision: [{"Name": f"gemm {precision}"}])
    inventory = doctor.Inventory("GPU 0: NVIDIA A10", "12.8", "NVIDIA A10 (compute capability 8.6)", "10.8.0.43")
    check = doctor.GpuCheck(tmp_path, inventory, lambda _: None)
    detail, data = check.build()
    assert calls == [("export", ["fp32", "fp16", "int8", "fp8", "int4"]), ("ort", None),
                     ("trt", ["fp32", "fp16", "int8", "int4"])]
    assert detail == "4 TensorRT plans; not on this GPU: fp8" and "8.9 or newer" in data["not_on_this_gpu"]["fp8"]
    assert check.kernels()[1] == {"int8": 1, "fp8": "not on this GPU", "int4": 1}
    # the plans take every batch the later checks run: the recorded check input (2 rows), the runs (2 and 4 with
    # guidance), the costs table and the calibration (20); the default static batch-1 plan took none of them
    plans = options[-1]
    assert plans.dynamic and plans.min_batch <= 2 and plans.max_batch >= 20


def test_tensorrt_parity_allows_the_16_bit_base_of_quantized_plans(quant_build):
    """A quantized TensorRT graph computes in fp16 outside its Q/DQ (int4: W4A16), its recorded output came from the
    fp32-based ORT twin: the fp16 tolerance, not int4's 1e-4; fp32 plans (no TF32) keep 1e-4."""
    from tmpdiff.commands.doctor import trt_parity_tolerance

    _, build_dir, _ = quant_build
    manifest = load_manifest(build_dir)
    assert trt_parity_tolerance(manifest, "fp32") == 1e-4
    for name in ("int8", "int4"):
        assert manifest.precisions[name].quantization["trt_base"] == "float16"
        assert trt_parity_tolerance(manifest, name) == 2e-2


def test_census_records_the_compute_dtype_of_gemms_softmax_and_norms(quant_build):
    """The census reads dtypes off the graph: the fp16 graph computes every GEMM, softmax and norm in float16, the
    fp32 graph in float32 (same node counts), and each quantized TensorRT graph's census is recorded in the manifest."""
    import onnx

    from tmpdiff.export.census import compute_dtypes

    _, build_dir, _ = quant_build
    manifest = load_manifest(build_dir)
    fp32 = compute_dtypes(onnx.load(str(build_dir / "fp32" / "model.onnx")))
    fp16 = compute_dtypes(onnx.load(str(build_dir / "fp16" / "model.onnx")))
    assert set(fp32) >= {"MatMul", "Gemm", "Softmax", "LayerNormalization"}
    assert all(list(per_op) == ["float32"] for per_op in fp32.values()), fp32
    assert {op: {"float16": sum(d.values())} for op, d in fp32.items()} == fp16
    for name in ("int8", "fp8", "int4"):
        entry = manifest.precisions[name]
        recorded = entry.quantization["trt_compute_dtypes"]
        assert recorded == compute_dtypes(onnx.load(str(build_dir / entry.trt_onnx))), name
        assert sum(recorded["MatMul"].values()) == sum(fp32["MatMul"].values())
        # a 16-bit base (ModelOpt's AutoCast): no GEMM, softmax or norm left in fp32
        assert entry.quantization["trt_base"] == "float16"
        assert all(set(per_op) == {"float16"} for per_op in recorded.values()), (name, recorded)
    # the standard-op fp16 graphs run on ORT-CPU in the parity check; int4's trt::DequantizeLinear cannot
    assert 0 < manifest.precisions["int8"].quantization["trt_parity_error"] <= 2e-2
    assert 0 < manifest.precisions["fp8"].quantization["trt_parity_error"] <= 4e-2
    assert manifest.precisions["int4"].quantization["trt_parity_error"] is None


def test_bf16_base_for_tensorrt_graphs_and_an_unknown_type_refused(bundled, tmp_path):
    """--trt-dtype bfloat16: every GEMM, softmax and norm of the TensorRT graph in bfloat16, the ORT twin unchanged in
    fp32; ORT-CPU has no bf16 Q/DQ kernels, so its parity is recorded as not run (None), never as a number."""
    import onnx

    from tests.conftest import small_calibration
    from tmpdiff.export.census import compute_dtypes
    from tmpdiff.export.exporter import export_model

    build_dir, _ = export_model(bundled.transformer_dir, tmp_path, ["int8"], model_id="bf", trt_dtype="bfloat16",
                                calibration=small_calibration(bundled))
    entry = load_manifest(build_dir).precisions["int8"]
    trt_dtypes = compute_dtypes(onnx.load(str(build_dir / entry.trt_onnx)))
    assert entry.quantization["trt_base"] == "bfloat16" and entry.quantization["trt_parity_error"] is None
    assert trt_dtypes and all(set(per_op) == {"bfloat16"} for per_op in trt_dtypes.values()), trt_dtypes
    assert all(set(per_op) == {"float32"} for per_op in compute_dtypes(onnx.load(str(build_dir / entry.onnx))).values())
    code, _, err = cli("export", bundled.transformer_dir, "--out", tmp_path, "--precisions", "int8", "--trt-dtype", "half")
    assert code == 2 and "'half' is not one of 'float16', 'bfloat16'" in err, err


def test_autocast_with_the_linear_cleanup_gives_autocasts_own_graph(fp32_build):
    """`to_half` swaps AutoCast's quadratic dead-node cleanup for a linear one: the same nodes and initializers as
    AutoCast's own conversion with the same nodes kept in fp32 (the input casts' order aside, which `to_half` makes
    the graph's input order)."""
    import onnx
    from modelopt.onnx.autocast.convert import convert_to_f16

    from tmpdiff.export.half import _fp32_kept, _stable_subgraph_nodes, to_half

    source = str(fp32_build / load_manifest(fp32_build).precisions["fp32"].onnx)
    ours = to_half(onnx.load(source), "test")
    with _stable_subgraph_nodes(), _fp32_kept():
        theirs = convert_to_f16(onnx.load(source), low_precision_type="fp16", keep_io_types=True)

    def parts(model):
        inputs = {i.name for i in model.graph.input}
        casts = next(i for i, n in enumerate(model.graph.node) if n.op_type != "Cast" or n.input[0] not in inputs)
        nodes = [n.SerializeToString() for n in model.graph.node]
        return sorted(nodes[:casts]), nodes[casts:], sorted(i.SerializeToString() for i in model.graph.initializer)

    assert len(ours.graph.node) == len(theirs.graph.node) > 0
    assert parts(ours) == parts(theirs)
    # and the input casts come in the graph's input order (AutoCast's own order is a set's: it changed between runs;
    # the timestep feeds its fp32 sinusoid uncast, so the DiT has one: test_input_casts_in_input_order has several)
    inputs = [i.name for i in ours.graph.input]
    cast = [n.input[0] for n in ours.graph.node if n.op_type == "Cast" and n.input[0] in inputs]
    assert len(cast) >= 1 and [n.input[0] for n in ours.graph.node[: len(cast)]] == [i for i in inputs if i in cast]


def test_autocast_never_holds_the_quantized_weights_and_converts_the_same(quant_build, monkeypatch, tmp_path):
    """`to_half` hands AutoCast the graph with its int8 weights as external data in a scratch file (AutoCast keeps
    several copies of what it is given): the converted graph equals AutoCast's own conversion of the whole graph."""
    import os

    import onnx
    from modelopt.onnx.autocast import convert

    from tmpdiff.export.half import _fp32_kept, _linear_cleanup, _stable_subgraph_nodes, to_half
    from tmpdiff.export.onnx_io import tensor_bytes

    _, build_dir, _ = quant_build
    source = str(build_dir / load_manifest(build_dir).precisions["int8"].trt_onnx)
    graph = onnx.load(source).graph
    dequantized = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    int8_bytes = sum(len(t.raw_data) for t in graph.initializer  # the weights, not the zero points
                     if t.data_type == onnx.TensorProto.INT8 and t.name in dequantized)
    seen = []
    original = convert.convert_to_f16
    monkeypatch.setattr(convert, "convert_to_f16", lambda model, **kw: seen.append(tensor_bytes(model)) or
                        original(model, **kw))
    cwd = os.getcwd()
    ours = to_half(onnx.load(source), "test")
    assert os.getcwd() == cwd
    with _stable_subgraph_nodes(), _linear_cleanup(), _fp32_kept():
        theirs = original(onnx.load(source), low_precision_type="fp16", keep_io_types=True)
    whole = tensor_bytes(onnx.load(source))
    assert int8_bytes > 0 and seen == [whole - int8_bytes]  # AutoCast saw everything but the int8 weights
    assert sorted(t.SerializeToString() for t in ours.graph.initializer) == \
        sorted(t.SerializeToString() for t in theirs.graph.initializer)
    assert sorted(n.SerializeToString() for n in ours.graph.node) == sorted(n.SerializeToString() for n in theirs.graph.node)


def test_ort_gpu_providers_compute_fp32_in_fp32_and_a_cpu_fallback_is_refused(monkeypatch, tmp_path):
    """The CUDA EP (alone, or as the TensorRT EP's fallback) is told not to use TF32; a session whose GPU provider did
    not start (ORT only warns and runs on the CPU) is refused, naming the graph."""
    from types import SimpleNamespace

    import onnxruntime

    from tmpdiff.engines.ort import check_provider, providers_for

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert providers_for("cuda") == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    chain = providers_for("trt-ep", {"trt_int8_enable": "True"})
    assert chain == [("TensorrtExecutionProvider", {"trt_int8_enable": "True"}),
                     ("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    fell_back = SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"])
    with pytest.raises(TmpdiffError, match="did not start CUDAExecutionProvider for --device cuda") as info:
        check_provider(fell_back, "cuda", tmp_path / "model.onnx")
    assert info.value.path == tmp_path / "model.onnx"
    check_provider(fell_back, "cpu", tmp_path / "model.onnx")
    check_provider(SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]), "cuda",
                   tmp_path / "model.onnx")


def test_the_gpu_check_never_replaces_its_outputs_by_surprise(tmp_path, monkeypatch):
    """`doctor --gpu` checks its results file and scratch folder before any check runs (it replaced both): an
    existing results file needs --force, a FIFO there is refused even with it."""
    import os

    from tmpdiff.commands import doctor

    ran: list[str] = []
    monkeypatch.setattr(doctor.GpuCheck, "run_all", lambda self: ran.append("checks") or [])
    inventory = doctor.Inventory("GPU 0: NVIDIA A10", "12.8", "NVIDIA A10 (compute capability 8.6)", "10.8.0.43")
    results = tmp_path / "results"
    (results / "nvidia-a10").mkdir(parents=True)
    (results / "nvidia-a10" / "gpu_check.json").write_text("last run's")
    with pytest.raises(TmpdiffError, match="exists; pass --force"):
        doctor.gpu_check(tmp_path / "work", results, inventory, lambda _: None)
    assert ran == [] and (results / "nvidia-a10" / "gpu_check.json").read_text() == "last run's"
    out = doctor.gpu_check(tmp_path / "work", results, inventory, lambda _: None, force=True)
    assert ran == ["checks"] and json.loads(out.read_text())["format"] == "tmpdiff.gpu_check/1"
    (tmp_path / "work").mkdir(exist_ok=True)
    os.mkfifo(tmp_path / "work" / "costs.json")
    with pytest.raises(TmpdiffError, match="FIFO"):
        doctor.gpu_check(tmp_path / "work", results, inventory, lambda _: None, force=True)
    assert ran == ["checks"]


@pytest.mark.parametrize("statuses, code", [(["passed", "passed"], 0), (["passed", "skipped"], 3),
                                            (["skipped", "failed"], 1)])
def test_doctor_gpu_exits_nonzero_unless_every_check_passed(tmp_path, monkeypatch, statuses, code):
    """A GPU machine without TensorRT skips every check: `doctor --gpu` (and scripts/gpu_check.sh) exited 0 as if the
    GPU path had passed. Skipped checks make the run incomplete (exit 3); a failure is 1; all passed is 0."""
    from tests.cli_helpers import cli
    from tmpdiff.commands import doctor

    inventory = doctor.Inventory("GPU 0: NVIDIA A10", "12.8", "NVIDIA A10 (compute capability 8.6)", None)
    monkeypatch.setattr(doctor, "inventory", lambda: inventory)
    monkeypatch.setattr(doctor.GpuCheck, "run_all",
                        lambda self: [doctor.CheckResult(f"check {i}", s, "") for i, s in enumerate(statuses)])
    got, out, err = cli("doctor", "--gpu", "--work", tmp_path / "work", "--results", tmp_path / "results")
    assert got == code, (out, err)
    assert ("incomplete: 1 of 2 checks skipped" in err) == (code == 3), err


def test_tensorrt_wheel_follows_torchs_cuda_version():
    # the metapackage installs TensorRT's CUDA 13 wheel whatever torch was built with; a CUDA 12 torch needs -cu12
    from tmpdiff.engines.trt_build import tensorrt_requirement

    assert tensorrt_requirement("12.8") == "tensorrt-cu12==10.16.1.11"  # pinned: plans load on their TensorRT only
    assert tensorrt_requirement("13.0") == "tensorrt-cu13==10.16.1.11"
    assert tensorrt_requirement(None) is tensorrt_requirement("11.8") is None  # no wheel fits: a CUDA torch first


def test_an_onnxruntime_gpu_of_another_cuda_major_is_skipped_with_the_reason(tmp_path):
    """onnxruntime lists its CUDA provider whenever it was compiled in; onnxruntime-gpu 1.31.1 is built for CUDA 13,
    so beside a CUDA 12 torch the provider check is skipped, saying why (it failed as if ORT were broken)."""
    from tmpdiff.commands import doctor

    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cu12 = doctor.Inventory("GPU 0: NVIDIA A10", "12.8", "NVIDIA A10 (compute capability 8.6)", "10.16.1.11", providers)
    reason = "onnxruntime-gpu==1.31.1 is built for CUDA 13, torch here for CUDA 12.8"
    assert any(reason in line for line in cu12.missing())
    check = doctor.GpuCheck(tmp_path, cu12, lambda _: None)
    assert check._run("ort providers", ["ort_cuda"], lambda: ("ran", {}))
    [result] = check.results
    assert result.status == "skipped" and reason in result.detail
    cu13 = doctor.Inventory("GPU 0: NVIDIA A10", "13.0", "NVIDIA A10 (compute capability 8.6)", "10.16.1.11", providers)
    assert cu13.ort_cuda_mismatch() is None and not cu13.missing()
    check = doctor.GpuCheck(tmp_path, cu13, lambda _: None)
    assert check._run("ort providers", ["ort_cuda"], lambda: ("ran", {})) and check.results[0].status == "passed"
