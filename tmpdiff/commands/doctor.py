"""`tmpdiff doctor [--gpu]`: what this machine has for tmpdiff's GPU path, and (with --gpu) the GPU checks.

The checks run in order and stop at the first failure with its cause; a check whose prerequisites are missing is
named as skipped, never silently passed: exit 1 when a check failed, 3 when none failed but some were skipped (the
run is incomplete), 0 when every check passed. Without an NVIDIA GPU the command says so in one line (exit 2). Nothing is
installed here: a GPU machine may have no registry access, so missing packages are listed with the command to run.
Results go to `results/<gpu-name>/gpu_check.json`.

None of the GPU checks has run yet: this project's machines have no GPU (see the README's GPU section).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tmpdiff.engines.trt_build import not_installed
from tmpdiff.formats.errors import TmpdiffError

# onnxruntime-gpu's pin and the CUDA major its wheel needs (its metadata: nvidia-cuda-runtime~=13.0)
ORT_GPU = "onnxruntime-gpu==1.31.1"
ORT_GPU_CUDA = "13"


@dataclass
class Inventory:
    """What is present for the GPU path."""

    nvidia_smi: str | None  # first GPU line of `nvidia-smi -L`
    torch_cuda: str | None  # torch's CUDA version, None for a CPU build
    gpu: str | None  # torch.cuda device 0 name and capability
    tensorrt: str | None
    ort_providers: list[str] = field(default_factory=list)

    def missing(self) -> list[str]:
        """Human lines for what is absent, with the install command for each."""
        lines = []
        if self.torch_cuda is None:
            lines.append("torch is a CPU build: pip install torch --index-url <the CUDA wheel index for your driver>")
        if self.tensorrt is None:
            lines.append(not_installed())
        if "CUDAExecutionProvider" not in self.ort_providers:
            lines.append(f"onnxruntime has no CUDA provider: pip uninstall -y onnxruntime && pip install {ORT_GPU} "
                         f"(the same module: never both installed; built for CUDA {ORT_GPU_CUDA})")
        elif self.ort_cuda_mismatch():
            lines.append(self.ort_cuda_mismatch())
        return lines

    def ort_cuda_mismatch(self) -> str | None:
        """Why onnxruntime's CUDA provider cannot load beside this torch (None when it can): it lists the provider
        whenever it was compiled in, so a CUDA major other than its own is only seen when a session starts."""
        major = (self.torch_cuda or "").split(".")[0]
        if "CUDAExecutionProvider" in self.ort_providers and major and major != ORT_GPU_CUDA:
            return (f"{ORT_GPU} is built for CUDA {ORT_GPU_CUDA}, torch here for CUDA {self.torch_cuda}: its CUDA "
                    f"provider cannot load beside it (a CUDA {ORT_GPU_CUDA} torch, or an onnxruntime-gpu of CUDA "
                    f"{major})")
        return None


def inventory() -> Inventory:
    import torch

    smi = None
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        smi = next(iter(done.stdout.strip().splitlines()), None) if done.returncode == 0 else None
    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        gpu = f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor})"
    trt = None
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            from tmpdiff.engines.trt_build import load_tensorrt

            trt = load_tensorrt().__version__
        except TmpdiffError:
            trt = None
    import onnxruntime

    return Inventory(smi, torch.version.cuda, gpu, trt, list(onnxruntime.get_available_providers()))


# A quantized TensorRT graph computes in its 16-bit base outside the Q/DQ pairs, while the output it is compared
# with came from the fp32-based ORT twin: the 16-bit rounding is in the difference. float16: the fp16 precision's
# tolerance; bfloat16 keeps 3 fewer mantissa bits (8x the rounding), 5e-2 is our stated bound, not measured.
_BASE_TOLERANCE = {"float16": 2e-2, "bfloat16": 5e-2}


def trt_parity_tolerance(manifest, name: str) -> float:
    """How far a precision's TensorRT plan may be from the ORT twin's recorded output (relative L2)."""
    from tmpdiff.formats.precisions import get_precision

    base = (manifest.precisions[name].quantization or {}).get("trt_base")
    return max(get_precision(name).parity_tolerance, _BASE_TOLERANCE.get(base, 0.0))


def _check_plans():
    """The checks' plans: batch 1..40 (the recorded check input has 2 rows, the runs 2 or 4 with guidance, the costs
    table and the calibration 20), optimised for 20."""
    from tmpdiff.engines.trt_build import TrtBuildOptions

    return TrtBuildOptions(batch=20, dynamic=True, min_batch=1, max_batch=40)


@dataclass
class CheckResult:
    name: str
    status: str  # passed | failed | skipped
    detail: str
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


class GpuCheck:
    """The GPU checks of issue #13, in order, on the bundled model in `work` (exported and built there)."""

    def __init__(self, work: Path, inv: Inventory, on_line: Callable[[str], None]) -> None:
        self.work = work
        self.inv = inv
        self.say = on_line
        self.results: list[CheckResult] = []
        self.build_dir = work / "build" / "tiny-dit"
        self.not_on_this_gpu: dict[str, str] = {}  # exported precisions this GPU cannot run, with the reason

    # ---- helpers --------------------------------------------------------------------------------------------
    def _run(self, name: str, needs: list[str], body: Callable[[], tuple[str, dict]]) -> bool:
        absent = [n for n in needs if not getattr(self, f"_has_{n}")()]
        if "ort_cuda" in absent and self.inv.ort_cuda_mismatch():  # present, but it cannot load: say why
            absent[absent.index("ort_cuda")] = f"ort_cuda ({self.inv.ort_cuda_mismatch()})"
        if absent:
            self.results.append(CheckResult(name, "skipped", f"needs {', '.join(absent)}"))
            self.say(f"skip  {name}: needs {', '.join(absent)}")
            return True
        started = time.perf_counter()
        try:
            detail, data = body()
        except Exception as exc:  # a check's failure is reported with its cause, then the run stops
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.results.append(CheckResult(name, "failed", message, time.perf_counter() - started))
            self.say(f"FAIL  {name}: {message}")
            return False
        self.results.append(CheckResult(name, "passed", detail, time.perf_counter() - started, data))
        self.say(f"ok    {name}: {detail}")
        return True

    def _has_tensorrt(self) -> bool:
        return self.inv.tensorrt is not None

    def _has_ort_cuda(self) -> bool:
        return "CUDAExecutionProvider" in self.inv.ort_providers and self.inv.ort_cuda_mismatch() is None

    def _has_ort_trt(self) -> bool:
        return "TensorrtExecutionProvider" in self.inv.ort_providers

    def _has_build(self) -> bool:
        return any(r.name == "build" and r.status == "passed" for r in self.results)

    def _fp16_sampling(self):
        """The fp16 TensorRT engine, the build's sampling info, and classes 1, 2 with their seed-0 noise."""
        import torch

        from tmpdiff.engines.loading import load_engines
        from tmpdiff.formats.manifest import load_manifest
        from tmpdiff.runtime.runner import initial_noise

        manifest = load_manifest(self.build_dir)
        sampling = manifest.sampling
        engines = load_engines(self.build_dir, manifest, "trt", "cuda", ["fp16"])
        return engines, sampling, torch.tensor([1, 2]), initial_noise(2, sampling.channels, sampling.image_size, 0)

    # ---- the checks -----------------------------------------------------------------------------------------
    def build(self) -> tuple[str, dict]:
        """Export all five precisions; build for TensorRT those this GPU runs (fp8 needs Ada, int4 Ampere)."""
        from tmpdiff.commands.export import calibration_for, resolve_model_dir
        from tmpdiff.engines.build import build_engines
        from tmpdiff.engines.trt_build import check_precision_supported, cuda_device
        from tmpdiff.export.exporter import export_model

        exported = ["fp32", "fp16", "int8", "fp8", "int4"]
        model_dir = resolve_model_dir("bundled", None)
        calibration, sampling = calibration_for(model_dir, [0, 1], None)
        export_model(model_dir, self.work / "build", exported, model_id="tiny-dit", calibration=calibration,
                     sampling=sampling)
        build_engines(self.build_dir, "ort", "cpu")
        gpu = cuda_device()
        for precision in exported:
            try:
                check_precision_supported(precision, gpu.compute_capability, gpu.name)
            except TmpdiffError as exc:
                self.not_on_this_gpu[precision] = str(exc)
        built = build_engines(self.build_dir, "trt", "cuda", [p for p in exported if p not in self.not_on_this_gpu],
                              trt_options=_check_plans())
        skipped = f"; not on this GPU: {', '.join(self.not_on_this_gpu)}" if self.not_on_this_gpu else ""
        return f"{len(built)} TensorRT plans{skipped}", {"plans": [str(o.path) for o in built],
                                                         "not_on_this_gpu": dict(self.not_on_this_gpu)}

    def kernels(self) -> tuple[str, dict]:
        """Engine inspector: INT8 and FP8 GEMM kernels, and int4 weight-only dequantisation, are in the plans (of the
        precisions this GPU runs)."""
        from tmpdiff.engines.trt import inspect_layers

        found: dict[str, int | str] = {}
        for precision, pattern in (("int8", r"int8|i8"), ("fp8", r"fp8|e4m3"), ("int4", r"int4|weightonly|dequant")):
            if precision in self.not_on_this_gpu:
                found[precision] = "not on this GPU"
                continue
            layers = inspect_layers(self.build_dir, precision)
            hits = [layer for layer in layers if re.search(pattern, json.dumps(layer), re.IGNORECASE)]
            if not hits:
                raise TmpdiffError(f"the {precision} plan's layers show no {precision} kernels ({len(layers)} layers)")
            found[precision] = len(hits)
        return ", ".join(f"{k}: {v}" + (" layers" if isinstance(v, int) else "") for k, v in found.items()), found

    def parity(self) -> tuple[str, dict]:
        from tmpdiff.commands.check import replay_check_inputs
        from tmpdiff.formats.manifest import load_manifest

        manifest = load_manifest(self.build_dir)
        replays = replay_check_inputs(self.build_dir, manifest, "trt", "cuda")
        errors = {name: r.error for name, r in replays.items()}
        bad = [f"{n} {r.failure or f'{r.error:.2e}'}" for n, r in replays.items()
               if r.failure or not r.error <= trt_parity_tolerance(manifest, n)]
        if bad:
            raise TmpdiffError(f"TensorRT plans differ from their ORT-CPU twins' recorded outputs: {'; '.join(bad)}")
        return ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), errors

    def costs(self) -> tuple[str, dict]:
        from tmpdiff.engines.profile import profile_build

        table = profile_build(self.build_dir, "trt", "cuda", batch=20, warmup=5, repeats=30)
        rel = table.relative("fp16")
        # The bundled model is small enough for a call to be launch-bound, where fp16 and fp32 cost about the same;
        # fp16 clearly slower than fp32 means a plan does not compute what its precision says.
        if not table.precisions["fp16"].median_ms <= 1.1 * table.precisions["fp32"].median_ms:
            raise TmpdiffError(f"fp16 is slower than fp32 (fp32 is {rel['fp32']:.2f}x of fp16)")
        note = "" if rel["fp32"] > 1 else " (fp16 not faster: launch-bound at this size)"
        return ", ".join(f"{k} {v:.2f}x fp16" for k, v in rel.items()) + note, table.model_dump(mode="json")

    def no_host_sync(self) -> tuple[str, dict]:
        """With the NaN guard off the step loop does not wait for the GPU: the synchronising operations torch reports
        (`torch.cuda.set_sync_debug_mode("warn")`) do not grow with the step count, while with the guard on they
        grow by one a step (which shows the detector sees them). And with ~1 s of GPU work queued on the caller's
        stream, `run` returns only after it: its latents are ordered after the caller's work."""
        import warnings

        import torch

        from tmpdiff.commands.run import RunRequest, run
        from tmpdiff.models.schedulers import sampling_scheduler
        from tmpdiff.runtime.engine_use import close_engines

        engines, sampling, labels, noise = self._fp16_sampling()

        def synchronisations(steps: int, nan_guard: bool) -> int:
            runner = _two_sample_runner(engines, sampling, nan_guard)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        runner.sample(sampling_scheduler(sampling), labels, noise, ["fp16"] * steps)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
            finally:
                runner.close()
            return sum("synchronizing" in str(w.message) for w in caught)

        try:
            counts = {f"{steps} steps, guard {'on' if guard else 'off'}": synchronisations(steps, guard)
                      for guard in (False, True) for steps in (4, 8)}
        finally:
            close_engines(engines.values())
        off, on = list(counts.values())[:2], list(counts.values())[2:]
        if on[1] - on[0] < 4:
            raise TmpdiffError(f"torch's sync detector did not see the NaN guard's read at every step ({counts}); "
                               "it cannot judge the step loop here")
        if off[1] - off[0] >= 4:
            raise TmpdiffError(f"the step loop synchronises at every step with the NaN guard off ({counts})")
        torch.cuda.synchronize()
        started = time.perf_counter()
        torch.cuda._sleep(int(2e9))
        torch.cuda.synchronize()
        queued = time.perf_counter() - started
        torch.cuda._sleep(int(2e9))  # the same GPU work queued on the caller's stream
        started = time.perf_counter()
        run(RunRequest(build_dir=self.build_dir, classes=[1, 2], steps=4, precision="fp16", backend="trt",
                       nan_guard=False))
        waited = time.perf_counter() - started
        if waited < 0.9 * queued:
            raise TmpdiffError(f"run returned after {waited:.2f} s, before the {queued:.2f} s of GPU work queued ahead "
                               "of it on the caller's stream: its latents are not ordered after the caller's work")
        return (f"synchronisations {counts}; run returned after {waited:.2f} s with {queued:.2f} s queued ahead",
                {"synchronisations": counts, "queued_seconds": queued, "run_seconds": waited})

    def caller_stream(self) -> tuple[str, dict]:
        import torch

        from tmpdiff.commands.run import RunRequest, run

        request = RunRequest(build_dir=self.build_dir, classes=[1, 2], steps=4, precision="fp16", backend="trt")
        plain = run(request)[0].latents
        with torch.cuda.stream(torch.cuda.Stream()):
            other = run(request)[0].latents
        if not torch.equal(plain, other):
            raise TmpdiffError("latents differ when the caller runs on its own stream")
        return "bit-identical latents from a caller stream", {}

    def cuda_graphs(self) -> tuple[str, dict]:
        from tmpdiff.models.schedulers import sampling_scheduler
        from tmpdiff.runtime.engine_use import close_engines

        engines, sampling, labels, noise = self._fp16_sampling()
        runner = _two_sample_runner(engines, sampling, nan_guard=False)
        try:
            runs = [runner.sample(sampling_scheduler(sampling), labels, noise, ["fp16"] * 4) for _ in range(2)]
            active = engines["fp16"].graph_active
        finally:
            runner.close()
            close_engines(engines.values())
        if not active:
            raise TmpdiffError("no CUDA graph was captured after the warm-up run (see the TensorRT log)")
        ms = [run.trace.steps[-1].seconds * 1e3 for run in runs]
        return f"graph active; last step {ms[1]:.2f} ms replayed vs {ms[0]:.2f} ms in the warm-up run", {"ms": ms}

    def schedule_speedup(self) -> tuple[str, dict]:
        """A schedule calibrated with the GPU costs: measured speedup within 5% of the costs table's prediction."""
        from tmpdiff.calibration.calibrate import Target, calibrate
        from tmpdiff.calibration.session import open_session
        from tmpdiff.formats.costs import CostsTable, save_costs

        costs = next(r.data for r in self.results if r.name == "costs")
        save_costs(CostsTable.model_validate(costs), self.work / "costs.json")
        session = open_session(self.build_dir, self.work / "costs.json", 10, "latent", "fp32", classes=list(range(10)),
                               seeds=[0], backend="trt", device="cuda")
        target = round(1 + 0.6 * (session.problem.max_speedup() - 1), 3)
        result = calibrate(session, Target(speedup=target))
        predicted, measured = result.file.predicted.speedup, result.file.measured.speedup
        if measured is None or abs(measured / predicted - 1) > 0.05:
            raise TmpdiffError(f"measured speedup {measured} vs predicted {predicted:.3f} (more than 5% apart)")
        return f"predicted {predicted:.3f}x, measured {measured:.3f}x", {"predicted": predicted, "measured": measured}

    def ort_providers(self) -> tuple[str, dict]:
        from tmpdiff.commands.run import RunRequest, run
        from tmpdiff.engines.build import build_engines

        reference = run(RunRequest(build_dir=self.build_dir, classes=[1], steps=5, precision="fp32", backend="trt"))[0]
        errors = {}
        for device in ("cuda", "trt-ep"):
            if device == "trt-ep" and not self._has_ort_trt():
                continue
            build_engines(self.build_dir, "ort", device, ["fp32"])
            got = run(RunRequest(build_dir=self.build_dir, classes=[1], steps=5, precision="fp32", device=device))[0]
            errors[device] = float((got.latents.cpu() - reference.latents.cpu()).abs().max())
            if not errors[device] < 1e-2:
                raise TmpdiffError(f"ORT {device} differs from TensorRT fp32 by {errors[device]:.2e}")
        return ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), errors

    def mixed_plan(self) -> tuple[str, dict]:
        """A TMPQ-DM plan with a mixed layer configuration (int8 / int4 / fp32 layers; no int4 on a GPU before Ampere):
        deployed, built as a TensorRT plan, run on TensorRT and on ORT-CPU (its twin); same engines per step, latents
        within 5e-2."""
        from tmpdiff.commands.deploy_plan import deploy_plan
        from tmpdiff.commands.export import resolve_model_dir
        from tmpdiff.commands.run import RunRequest, run
        from tmpdiff.engines.build import build_engines
        from tmpdiff.export.supernet import supernet_from_build
        from tmpdiff.formats.manifest import load_manifest, mixed_name
        from tmpdiff.formats.schedule import SchedulerRef
        from tmpdiff.formats.tmpq_plan import TmpqPlan, save_tmpq_plan

        model_dir = resolve_model_dir("bundled", None)
        manifest = load_manifest(self.build_dir)
        quantized = [p for p in ("int8", "int4") if p not in self.not_on_this_gpu]
        layers = list(supernet_from_build(self.build_dir, model_dir, quantized).layers)
        levels = (*quantized, "fp32")
        mixed = [levels[i % len(levels)] for i in range(len(layers))]
        s = manifest.sampling
        plan = TmpqPlan(model_id=manifest.model_id, steps=4, timesteps=[999, 700, 400, 100], layers=layers,
                        scheduler=SchedulerRef(class_name=s.scheduler_class, config=dict(s.scheduler_config)),
                        configs=[mixed, ["int8"] * len(layers)], step_configs=[0, 1, 1, 0])
        path = self.work / "mixed-plan.json"
        save_tmpq_plan(plan, path)
        deploy_plan(self.build_dir, path, model_dir)
        build_engines(self.build_dir, "trt", "cuda", [mixed_name(layers, mixed), "int8"], trt_options=_check_plans())
        request = {"build_dir": self.build_dir, "classes": [1, 2], "seed": 0, "schedule_path": path}
        on_trt = run(RunRequest(**request, backend="trt"))[0]
        on_ort = run(RunRequest(**request))[0]
        name, used = mixed_name(layers, mixed), [e.precision for e in on_trt.trace.steps]
        if used != [name, "int8", "int8", name]:
            raise TmpdiffError(f"the plan ran {used} on TensorRT, not {name} / int8 / int8 / {name}")
        error = float((on_trt.latents.cpu() - on_ort.latents).norm() / on_ort.latents.norm())
        if not error < 5e-2:
            raise TmpdiffError(f"the mixed plan on TensorRT differs from its ORT twin by {error:.2e} (relative L2)")
        return f"{name} on TensorRT vs its ORT twin: {error:.1e} over 4 steps", {"error": error, "engines": used}

    def run_all(self) -> list[CheckResult]:
        steps = [("build", ["tensorrt"], self.build), ("kernels", ["tensorrt", "build"], self.kernels),
                 ("parity", ["tensorrt", "build"], self.parity), ("costs", ["tensorrt", "build"], self.costs),
                 ("no host sync", ["tensorrt", "build"], self.no_host_sync),
                 ("caller stream", ["tensorrt", "build"], self.caller_stream),
                 ("cuda graphs", ["tensorrt", "build"], self.cuda_graphs),
                 ("ort providers", ["tensorrt", "build", "ort_cuda"], self.ort_providers),
                 ("schedule speedup", ["tensorrt", "build"], self.schedule_speedup),
                 ("mixed plan", ["tensorrt", "build"], self.mixed_plan)]
        for name, needs, body in steps:
            if not self._run(name, needs, body):
                break
        return self.results


def _two_sample_runner(engines, sampling, nan_guard: bool):
    """A runner of the two-sample batch `GpuCheck._fp16_sampling` gives, on the GPU."""
    from tmpdiff.runtime.runner import ScheduledRunner

    return ScheduledRunner(engines, 2, sampling.channels, sampling.image_size, sampling.guidance_scale,
                           sampling.null_class, sampling.num_classes, device="cuda", nan_guard=nan_guard)


WORK_FILES = ("costs.json", "mixed-plan.json")  # what the checks write in --work besides its build/


def _why_torch_sees_none() -> str:
    """The likely reason torch sees no GPU that nvidia-smi sees: a CPU build, or a driver too old for its CUDA."""
    import torch

    from tmpdiff.engines.trt_build import torch_build

    if torch.version.cuda is None:
        return f"torch here is {torch_build()}; install a CUDA 12 or 13 build"
    # NVIDIA's minimum Linux drivers: CUDA 12.x r525, CUDA 13.x r580
    needs = "r580" if torch.version.cuda.startswith("13") else "r525"
    return f"torch here is {torch_build()}, which needs driver {needs} or later (nvidia-smi shows the driver's version)"


def gpu_check(work: Path, results_root: Path, inv: Inventory, on_line: Callable[[str], None],
              force: bool = False) -> Path:
    """Run the GPU checks; TmpdiffError (one line) when there is no GPU; returns the JSON written. Its outputs (the
    scratch folder's files, the results file) are checked first: an existing results file or a non-empty scratch folder
    is replaced only with `force` (what `scripts/gpu_check.sh` passes: a re-run refreshes its own results)."""
    from tmpdiff.formats.atomic import write_json
    from tmpdiff.formats.outputs import Output, check_outputs

    if inv.gpu is None:
        raise TmpdiffError("no NVIDIA GPU visible to torch (torch.cuda.is_available() is False): the GPU checks need one"
                           + (f"; nvidia-smi sees {inv.nvidia_smi}: {_why_torch_sees_none()}" if inv.nvidia_smi else ""))
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", inv.gpu.split(" (")[0]).strip("-").lower()
    paths = check_outputs([Output.folder("--work", work, WORK_FILES),
                           Output.file("--results", results_root / name / "gpu_check.json", ".json")], force=force)
    work, out = paths["--work"], paths["--results"]
    results = GpuCheck(work, inv, on_line).run_all()
    write_json(out, {"format": "tmpdiff.gpu_check/1", "inventory": asdict(inv),
                     "results": [asdict(r) for r in results]})
    return out
