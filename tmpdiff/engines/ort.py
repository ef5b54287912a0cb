"""ONNX Runtime engine: CPU provider here; CUDA and TensorRT execution providers with onnxruntime-gpu.

Inputs and outputs are bound with IOBinding to runtime-owned torch tensors, so a latent handed from
one step to the next never passes through a Python-side copy.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from tmpdiff.engines.base import check_buffers
from tmpdiff.engines.ort_process import process_state
from tmpdiff.engines.streams import Stream
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.specs import TensorSpec

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16"}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt-ep": "TensorrtExecutionProvider"}
LEVELS = ("disable", "basic", "extended", "all")


@contextlib.contextmanager
def load_errors(path: Path) -> Iterator[None]:
    """Whatever ONNX Runtime raises while opening a session of `path` (a truncated or invalid graph) as a TmpdiffError
    naming it."""
    try:
        yield
    except TmpdiffError:
        raise
    except Exception as exc:  # ORT raises its own pybind exception types for bad graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TmpdiffError(f"ONNX Runtime cannot load this model ({first})", path) from None


def share_runtime_resources(threads: int | None = None) -> None:
    """Set up what the runtime's sessions share: always one CPU memory arena; one thread pool if `own_process()`.

    The runtime holds one session per precision and alternates between them. With an arena per session,
    each switch computes in other, cache-cold activation memory: two sessions of the same fp32 graph
    alternated through ORT cost +3.4% per run on this project's 2-core Xeon (batch 20), +0.3% with one
    arena. One thread pool lets its threads spin between ops without idle pools stealing the cores
    (28.7 -> 23.1 ms per fp32 step there); per-session pools must block instead. ORT sets both up once
    per process: a later request for another pool size keeps the first (with a warning).
    TMPDIFF_ORT_PER_SESSION_THREADS=1 turns the shared pool off.
    """
    import onnxruntime as ort

    if "arena" not in process_state:
        cpu_arena = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(cpu_arena, ort.OrtArenaCfg(0, -1, -1, -1))  # ORT's default arena settings
        process_state["arena"] = True
    if not process_state.get("own_process") or os.environ.get("TMPDIFF_ORT_PER_SESSION_THREADS") == "1":
        return
    size = threads or len(os.sched_getaffinity(0))
    if "threads" in process_state:
        if process_state["threads"] != size:
            warnings.warn(f"the shared ORT thread pool already has {process_state['threads']} threads; "
                          f"{size} requested, {process_state['threads']} kept", stacklevel=2)
        return
    ort.set_global_thread_pool_sizes(size, 1)
    process_state["threads"] = size


def session_options(threads: int | None = None, optimization: str = "all", optimized_path: Path | None = None,
                    runtime: bool = False, optimized_data: bool = False, priority_order: bool = False):
    """ORT session options set deliberately: threads, graph optimisation level, where to save the optimised graph
    (with `optimized_data`, its weights in `<name>.data` beside it); `runtime` sessions use what
    `share_runtime_resources` set up; `priority_order` for one-off checks of graphs with quantized weights (ORT's
    priority-based order, no CPU arena: below)."""
    import onnxruntime as ort

    levels = dict(zip(LEVELS, (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                               ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                      strict=True))
    if optimization not in levels:
        raise TmpdiffError(f"unknown ORT optimisation level {optimization!r}; choose from {', '.join(levels)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    if runtime and process_state.get("arena"):
        opts.add_session_config_entry("session.use_env_allocators", "1")
    if "threads" in process_state:  # a global pool exists: ORT refuses sessions with their own from now on
        opts.use_per_session_threads = False
    elif threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if priority_order:
        # ORT's default order runs every weight's DequantizeLinear (and the fp32 Cast it inserts for ops without fp16
        # kernels) before the first layer, so a run of a Q/DQ graph holds all weights dequantized at once; the
        # priority-based order holds them in 16 bits only (40 int8 4096^2 layers, fp16 compute: 3.32 -> 2.06 GiB)
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        # and without the CPU arena: with it, each run of that order kept the weights it dequantized (SDXL-size int8
        # TensorRT graph, runs of 1 row: 12.1 GiB after the first, 21.0 after the second; arena off: 14.0 at most)
        opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
        # a session that only writes the optimised graph never runs: packing its weights for the kernels would hold
        # a second copy of them (the packed form is not what is saved)
        opts.add_session_config_entry("session.disable_prepacking", "1")
        if optimized_data:  # weights beside the graph: a protobuf over 2 GB cannot be written
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          f"{Path(optimized_path).name}.data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    # ORT fuses int4 DequantizeLinear + MatMul into MatMulNBits; its default accuracy level 4 quantizes
    # the activations to int8 inside the kernel (W4A8). Level 1 keeps them fp32: the W4A16 that
    # TensorRT computes and that the parity test checks (1e-3 -> 2e-7 relative error, measured).
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    # Sessions with their own pools (export parity, build, check; the runtime uses the shared pool) alternate
    # too. Spinning intra-op threads of idle sessions steal the cores from the active one (2 cores, 5 sessions interleaved:
    # fp32 step 76.7 ms spinning, 59.8 ms blocking; one session alone: 48.8 ms spinning, 58.2 blocking).
    # Blocking is the default; TMPDIFF_ORT_SPINNING=1 turns spinning back on.
    opts.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("TMPDIFF_ORT_SPINNING", "0"))
    return opts


def providers_for(device: str, trt_ep: dict[str, str] | None = None) -> list:
    """Execution providers for a device name, checked against what this onnxruntime build offers; `trt_ep` holds the
    TensorRT EP's options (caches, profile shapes, int8) for --device trt-ep."""
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise TmpdiffError(f"unknown ORT device {device!r}; choose from {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[device]
    if wanted not in ort.get_available_providers():
        raise TmpdiffError(
            f"onnxruntime {ort.__version__} here has no {wanted}; for --device {device}, on a machine with an NVIDIA "
            "GPU: pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.31.1"
        )
    if device == "cpu":
        return ["CPUExecutionProvider"]
    stream: dict[str, str] = {}
    if torch.cuda.is_available():
        # Launch on the runtime's dedicated stream, where the sampling loop's torch work runs too: ordered without
        # host synchronisation (run() also tells ORT not to synchronise after each run).
        from tmpdiff.engines.streams import runtime_stream

        stream = {"user_compute_stream": str(runtime_stream(device).handle)}
    # the CUDA EP lets fp32 GEMMs and convolutions use TF32 unless told not to: a precision computes what it says
    cuda = {**stream, **({"has_user_compute_stream": "1"} if stream else {}), "use_tf32": "0"}
    if device == "cuda":
        return [(wanted, cuda), "CPUExecutionProvider"]
    # the TensorRT EP's nodes, and the CUDA EP's fallback nodes, both on the runtime stream
    return [(wanted, {**stream, **(trt_ep or {})}), ("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


def check_provider(session, device: str, path: Path) -> None:
    """A GPU provider that fails to initialise (CUDA or cuDNN libraries not found, another CUDA major) only logs a
    warning and leaves the session on the CPU: refused here, before a 'cuda' engine runs on the host."""
    wanted = PROVIDERS[device]
    active = session.get_providers()
    if active and active[0] != wanted:
        raise TmpdiffError(f"ONNX Runtime did not start {wanted} for --device {device} (the session runs on "
                           f"{', '.join(active)}; see onnxruntime's warning above: usually CUDA, cuDNN or TensorRT "
                           "libraries it cannot load)", path)


class OrtEngine:
    """An ONNX graph in an ORT session, runnable on host arrays (`infer`) or bound buffers (`bind`/`run`)."""

    def __init__(
        self,
        onnx_path: str | Path,
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        optimization: str = "all",
        optimized_path: Path | None = None,
        runtime: bool = False,
        trt_ep: dict[str, str] | None = None,
        optimized_data: bool = False,
        priority_order: bool = False,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        self.precision = precision
        self.device = device
        if not self.path.is_file():
            raise TmpdiffError("ONNX file is missing", self.path)
        with load_errors(self.path):
            self.session = ort.InferenceSession(
                str(self.path), sess_options=session_options(threads, optimization, optimized_path, runtime,
                                                                optimized_data, priority_order),
                providers=providers_for(device, trt_ep),
            )
        check_provider(self.session, device, self.path)
        self._binding = None
        self._run_options = ort.RunOptions()
        if device != "cpu":  # the runtime orders work on its stream; ORT's per-run device synchronisation is not needed
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec(i.name, _ORT_TYPES.get(i.type, i.type), tuple(i.shape)) for i in self.session.get_inputs()]

    @property
    def output_specs(self) -> list[TensorSpec]:
        return [TensorSpec(o.name, _ORT_TYPES.get(o.type, o.type), tuple(o.shape)) for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on host arrays (tests, export parity); the runtime uses bind/run instead."""
        names = [o.name for o in self.session.get_outputs()]
        try:
            return dict(zip(names, self.session.run(names, feeds), strict=True))
        except Exception as exc:  # onnxruntime's Fail / InvalidArgument for shapes and kernels
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TmpdiffError(f"{self.precision} engine failed to run ({first})", self.path) from None

    def bind(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        """Bind runtime-owned tensors by pointer; later `run` calls read and write them in place."""
        name = f"{self.precision} engine ({self.path})"
        check_buffers(name, self.input_specs, inputs)
        check_buffers(name, self.output_specs, outputs)
        binding = self.session.io_binding()
        for spec in self.input_specs:
            self._bind_one(binding.bind_input, spec, inputs[spec.name])
        for spec in self.output_specs:
            self._bind_one(binding.bind_output, spec, outputs[spec.name])
        self._binding = binding

    @staticmethod
    def _bind_one(bind, spec: TensorSpec, tensor: torch.Tensor) -> None:
        device_type = "cuda" if tensor.is_cuda else "cpu"
        device_id = (tensor.device.index or 0) if tensor.is_cuda else 0
        bind(spec.name, device_type, device_id, np.dtype(spec.dtype), tuple(tensor.shape), tensor.data_ptr())

    def run(self, stream: Stream) -> None:
        """One inference on the bound buffers (ORT orders it on the stream it was given at load)."""
        if self._binding is None:
            raise TmpdiffError(f"{self.precision} engine: run() before bind()")
        self.session.run_with_iobinding(self._binding, self._run_options)

    def unbind(self) -> None:
        self._binding = None

    def close(self) -> None:
        self.unbind()  # the session is freed with the engine object
