"""Native TensorRT engine: a plan bound once to runtime-owned CUDA buffers and launched per step.

Engines that the runtime switches between share one activation allocation (`SharedDeviceMemory`,
sized to the largest engine), because only one of them runs at a time on the runtime's stream. Each
engine can capture its launch into a CUDA graph after one warm-up run and replay it afterwards.

`tensorrt` is imported lazily: importing this module never needs TensorRT or a GPU.
Building lives in `tmpdiff.engines.trt_build`; its public names are re-exported here.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tmpdiff.engines.base import check_buffers
from tmpdiff.engines.streams import GPU_LOCK, CudaStream, Stream
from tmpdiff.engines.trt_build import (
    REBUILD_HINT,
    CudaDevice,
    ProfileShape,
    ProfileShapes,
    TrtBuildOptions,
    build_trt_engine,
    check_precision_supported,
    cuda_device,
    first_error,
    load_tensorrt,
    not_installed,
    options_profile,
    parse_compute_capability,
    parse_version,
    plan_file_name,
    polygraphy_command,
    profile_shapes,
    trt_logger,
    trtexec_command,
)
from tmpdiff.formats.atomic import sha256_file
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import EngineEntry
from tmpdiff.formats.precisions import PRECISIONS
from tmpdiff.formats.specs import TensorSpec

__all__ = [
    "not_installed", "CudaDevice", "ProfileShape", "ProfileShapes",
    "SharedDeviceMemory", "TrtBuildOptions", "TrtEngine", "build_trt_engine", "check_engine_compatible", "gpu_mismatch",
    "check_precision_supported", "cuda_device", "default_device_memory", "load_tensorrt", "load_trt_engine",
    "options_profile", "parse_compute_capability",
    "parse_version", "plan_file_name", "polygraphy_command", "profile_shapes", "trtexec_command",
]

log = logging.getLogger("tmpdiff.trt")

# TensorRT DataType member name -> numpy dtype name used by TensorSpec.
_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
# IExecutionContext.set_device_memory (setDeviceMemoryV2) wants memory aligned to the device's CUDA alignment
# property (its texture alignment, 512 bytes on every current GPU); tensor addresses want 256
_ALIGNMENT = 512


def gpu_mismatch(entry: EngineEntry, gpu: CudaDevice, strict_gpu_model: bool = True) -> str | None:
    """Why a plan built for `entry`'s GPU cannot run on `gpu` (None if it can): another architecture, or with
    `strict_gpu_model` another GPU model (the built model is `build_flags["gpu_name"]`)."""
    built_gpu = entry.build_flags.get("gpu_name")
    built_cc = entry.compute_capability
    if built_cc is None or parse_compute_capability(built_cc) != parse_compute_capability(gpu.compute_capability) or (
            strict_gpu_model and built_gpu is not None and built_gpu != gpu.name):
        built = f"{built_gpu or 'unknown GPU'} (compute capability {built_cc or '?'})"
        return f"plan built for {built}, this GPU is {gpu.name} (compute capability {gpu.compute_capability})"
    return None


def check_engine_compatible(entry: EngineEntry, plan_path: str | Path, trt_version: str, gpu: CudaDevice,
                            strict_gpu_model: bool = True) -> None:
    """Refuse a manifest engine built by another TensorRT version or for another GPU.

    A plan loads only in the TensorRT version that built it and only on the GPU architecture it was built
    for; TensorRT also advises against using a plan on another GPU model of the same architecture, which
    `strict_gpu_model` refuses too.
    """
    plan_path = Path(plan_path)
    if entry.backend != "trt":
        raise TmpdiffError(f"manifest entry is a {entry.backend} engine, not a TensorRT plan", plan_path)
    if entry.backend_version != trt_version:
        raise TmpdiffError(
            f"plan built by TensorRT {entry.backend_version}, this is TensorRT {trt_version}; {REBUILD_HINT}", plan_path)
    mismatch = gpu_mismatch(entry, gpu, strict_gpu_model)
    if mismatch is not None:
        raise TmpdiffError(f"{mismatch}; {REBUILD_HINT}", plan_path)


class SharedDeviceMemory:
    """One device allocation shared as activation memory by every attached engine's execution context.

    Sound only because attached engines run one at a time on one stream (the runtime's step loop). The
    allocation grows to the largest engine's `device_memory_size_v2`; growing re-points every attached
    context and drops their CUDA graphs, which baked in the old address. `torch.device("cpu")` keeps the same
    bookkeeping in host memory (no engine can use it; it is how the sharing rules are checked without a GPU).
    """

    def __init__(self, device: int | str | torch.device | None = None, release_when_unused: bool = False) -> None:
        if isinstance(device, torch.device) and device.type == "cpu":
            self.torch_device, self.device_index = device, -1
        else:
            self.device_index = cuda_device(device).index
            self.torch_device = torch.device("cuda", self.device_index)
        self.release_when_unused = release_when_unused
        self._buffer: torch.Tensor | None = None
        self._size = 0
        self._users: weakref.WeakSet[TrtEngine] = weakref.WeakSet()

    @property
    def size(self) -> int:
        """Usable bytes from `address` on (0 when nothing is allocated)."""
        return self._size

    @property
    def address(self) -> int:
        """The block's first `_ALIGNMENT`-byte aligned address (what set_device_memory requires)."""
        if self._buffer is None:
            raise TmpdiffError("shared device memory is not allocated")
        return self._buffer.data_ptr() + (-self._buffer.data_ptr()) % _ALIGNMENT

    def reserve(self, nbytes: int) -> None:
        """Make the allocation at least `nbytes` long (re-pointing attached engines if it moves). An engine that needs
        no activation memory still gets a valid (1-byte) allocation to point at. Waits for a call running on another
        thread (`GPU_LOCK`): its launches must not read a block freed or re-pointed under them."""
        with GPU_LOCK:
            self._reserve(nbytes)

    def _reserve(self, nbytes: int) -> None:
        if self._buffer is not None and nbytes <= self.size:
            return
        size = max(nbytes, _ALIGNMENT)  # TensorRT may take a null pointer for 0 bytes, but `address` must stay valid
        # the new block while the old one is held, if both fit; else the old one is let go first. Either way the
        # attached engines never point at freed memory: out of memory, they get the old size back before the error.
        grown = self._allocate(size)
        if grown is None and self._buffer is not None:
            held = self._size
            self._wait_for_launches()  # the old block may still be read by queued launches
            self._buffer, self._size = None, 0
            grown = self._allocate(size)
            if grown is None:
                restored = self._allocate(held)
                self._buffer, self._size = restored, held if restored is not None else 0
                if restored is not None:
                    for engine in list(self._users):
                        engine._use_device_memory(self)
        if grown is None:
            held = (f"the engines keep a {self._size / 2**20:.0f} MiB block" if self._buffer is not None else
                    "the engines sharing it have none left: close them")
            raise TmpdiffError(f"not enough free memory on {self.torch_device} for {nbytes / 2**20:.0f} MiB of "
                               f"TensorRT activation memory ({held})")
        if self._buffer is not None:
            self._wait_for_launches()
        self._buffer, self._size = grown, size
        for engine in list(self._users):
            engine._use_device_memory(self)

    def _allocate(self, size: int) -> torch.Tensor | None:
        """`size` usable bytes (room to align the start: torch's CUDA allocator hands out 512-byte aligned blocks,
        host memory may not), or None when the device has not that much free."""
        try:
            return torch.empty(size + _ALIGNMENT - 1, dtype=torch.uint8, device=self.torch_device)
        except torch.OutOfMemoryError:
            return None

    def attach(self, engine: TrtEngine, nbytes: int) -> None:
        """Reserve `nbytes` for `engine` and point its context at the shared allocation."""
        with GPU_LOCK:
            self._reserve(nbytes)
            self._users.add(engine)
            engine._use_device_memory(self)

    def detach(self, engine: TrtEngine) -> None:
        """Forget `engine`; with `release_when_unused`, the last detach frees the allocation."""
        with GPU_LOCK:
            self._users.discard(engine)
            if self.release_when_unused and not len(self._users):
                self.close()

    def close(self) -> None:
        """Free the allocation; attached engines must be closed first."""
        with GPU_LOCK:
            if len(self._users):
                raise TmpdiffError(f"shared device memory still has {len(self._users)} engine(s) attached; close "
                                   "them first")
            if self._buffer is not None:
                self._wait_for_launches()
            self._buffer, self._size = None, 0

    def _wait_for_launches(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.device_index)


_DEFAULT_MEMORY: dict[int, SharedDeviceMemory] = {}


def default_device_memory(device: int | str | None = None) -> SharedDeviceMemory:
    """The process-wide shared activation memory of one GPU (freed when its last engine closes).

    Engines opened with it must run one at a time on one stream, as tmpdiff's runtime and profiler do;
    give engines that run concurrently their own `SharedDeviceMemory`.
    """
    index = cuda_device(device).index
    if index not in _DEFAULT_MEMORY:
        _DEFAULT_MEMORY[index] = SharedDeviceMemory(index, release_when_unused=True)
    return _DEFAULT_MEMORY[index]


def inspect_layers(build_dir: str | Path, precision: str) -> list[dict]:
    """The engine inspector's JSON layer list of a built plan (layer names, types, precisions, tactics; plans are
    built with DETAILED profiling verbosity so these are present)."""
    from tmpdiff.formats.manifest import engine_key, load_manifest

    manifest = load_manifest(build_dir)
    entry = manifest.engines.get(engine_key("trt", "cuda", precision))
    if entry is None:
        raise TmpdiffError(f"no TensorRT plan for {precision}", Path(build_dir) / "manifest.json")
    engine = load_trt_engine(build_dir, entry)
    try:
        return engine.layer_information()
    finally:
        engine.close()


def load_trt_engine(build_dir: str | Path, entry: EngineEntry, *, memory: SharedDeviceMemory | None = None,
                    cuda_graph: bool = False, input_specs: list[TensorSpec] | None = None,
                    output_specs: list[TensorSpec] | None = None, device: int | str | None = None) -> TrtEngine:
    """Open a manifest's TensorRT engine (plan path kept inside the build dir; version, GPU and sha256 checked).

    Without `memory`, engines of one GPU share `default_device_memory()`.
    """
    root = Path(build_dir).resolve()
    path = (root / entry.path).resolve()
    if not path.is_relative_to(root):
        raise TmpdiffError(f"{entry.precision}: plan path escapes the build directory", root / "manifest.json")
    if memory is None:
        load_tensorrt()  # a missing TensorRT is the first error, before any CUDA check
        memory = default_device_memory(device)
    return TrtEngine(path, entry, memory=memory, cuda_graph=cuda_graph, device=device, input_specs=input_specs,
                     output_specs=output_specs)


def _torch_stream(stream: Stream, device_index: int) -> torch.cuda.Stream:
    if isinstance(stream, CudaStream):
        return stream.torch
    handle = int(getattr(stream, "handle", 0) or 0)
    if not handle:
        raise TmpdiffError("TensorRT engines run on a CUDA stream (tmpdiff.engines.trt.CudaStream), not the host stream")
    return torch.cuda.ExternalStream(handle, device=torch.device("cuda", device_index))


class TrtEngine:
    """A deserialized TensorRT plan with one USER_MANAGED execution context (implements `Engine`)."""

    def __init__(self, plan_path: str | Path, entry: EngineEntry | None = None, *, precision: str | None = None,
                 memory: SharedDeviceMemory | None = None, cuda_graph: bool = False, device: int | str | None = None,
                 input_specs: list[TensorSpec] | None = None, output_specs: list[TensorSpec] | None = None,
                 verify_sha256: bool = True, strict_gpu_model: bool = True) -> None:
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        self._memory: SharedDeviceMemory | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._bound: dict[str, torch.Tensor] | None = None

        trt = load_tensorrt()
        gpu = cuda_device(device if device is not None else (memory.device_index if memory is not None else None))
        self.path = Path(plan_path)
        self.device = f"cuda:{gpu.index}"
        self.gpu = gpu
        self.precision = entry.precision if entry is not None else (precision or self.path.parent.name)
        self.cuda_graph = cuda_graph
        self._device_index = gpu.index
        self._trt = trt
        if memory is not None and memory.device_index != gpu.index:
            raise TmpdiffError(f"shared device memory is on cuda:{memory.device_index}, engine on {self.device}")

        if not self.path.is_file():
            raise TmpdiffError(f"plan file is missing; {REBUILD_HINT}", self.path)
        if entry is not None:
            check_engine_compatible(entry, self.path, trt.__version__, gpu, strict_gpu_model)
            if verify_sha256 and sha256_file(self.path) != entry.sha256:
                raise TmpdiffError(f"plan does not match the manifest's sha256; {REBUILD_HINT}", self.path)
        if self.precision in PRECISIONS:
            check_precision_supported(self.precision, gpu.compute_capability, gpu.name)

        logger = trt_logger(trt)
        with torch.cuda.device(gpu.index):
            self._runtime = trt.Runtime(logger)
            logger.take_errors()
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                reason = first_error(logger.take_errors(), "truncated or corrupt plan")
                raise TmpdiffError(f"TensorRT cannot deserialize this plan ({reason}); {REBUILD_HINT}", self.path)
            self._context = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if self._context is None:
                raise TmpdiffError(f"TensorRT could not create an execution context "
                                   f"({first_error(logger.take_errors(), 'no error was logged')})", self.path)
            # Plans are built with DETAILED profiling verbosity (the layer inspector and `profile --layers` read it);
            # NVTX ranges at that verbosity slow every enqueue, so the runtime's launches mark layer names only.
            # (never above the plan's own verbosity, which TensorRT refuses: an imported plan may have been built
            # with none)
            if getattr(self._engine, "profiling_verbosity", None) != trt.ProfilingVerbosity.NONE:
                self._context.nvtx_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
        self._inputs, self._outputs = self._io_specs()
        if input_specs is not None:
            self._inputs = self._check_specs("input", input_specs, self._inputs)
        if output_specs is not None:
            self._outputs = self._check_specs("output", output_specs, self._outputs)
        memory = memory or SharedDeviceMemory(gpu.index, release_when_unused=True)
        memory.attach(self, int(self._engine.device_memory_size_v2))

    # -- Engine protocol ----------------------------------------------------------------------------

    @property
    def input_specs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def output_specs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @property
    def device_memory_size(self) -> int:
        """Activation memory this engine needs (bytes), the most over its optimization profile."""
        return int(self._require_open().device_memory_size_v2)

    def bind(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        """Set input shapes and every tensor address from runtime-owned CUDA buffers (once per buffer set)."""
        self._require_open()
        name = f"TensorRT {self.precision} engine"
        check_buffers(name, self._inputs, inputs)
        check_buffers(name, self._outputs, outputs)
        for buffers in (inputs, outputs):
            for key, buf in buffers.items():
                if buf.device.type != "cuda" or buf.device.index != self._device_index:
                    raise TmpdiffError(f"{name}: {key} buffer is on {buf.device}, engine runs on {self.device}")
        # A failed bind leaves the engine unbound, never half re-bound behind an old graph.
        self._graph, self._bound = None, None
        ctx = self._context
        trt_logger(self._trt).take_errors()  # an earlier call's errors are not this bind's
        for spec in self._inputs:
            shape = tuple(inputs[spec.name].shape)
            if not ctx.set_input_shape(spec.name, shape):
                low, high = self._shape_range(spec.name)
                raise TmpdiffError(f"{name}: {spec.name} shape {shape} is outside the engine's profile {low}..{high}; "
                                   f"rebuild with a matching batch (or --dynamic)")
        unresolved = ctx.infer_shapes()
        if unresolved:
            raise TmpdiffError(f"{name}: TensorRT cannot infer shapes of {', '.join(unresolved)}")
        for spec in self._outputs:
            want = tuple(ctx.get_tensor_shape(spec.name))
            if tuple(outputs[spec.name].shape) != want:
                raise TmpdiffError(f"{name}: {spec.name} buffer has shape {tuple(outputs[spec.name].shape)}, "
                                   f"these inputs give {want}")
        bound = {**{s.name: inputs[s.name] for s in self._inputs}, **{s.name: outputs[s.name] for s in self._outputs}}
        for key, buf in bound.items():
            if not ctx.set_tensor_address(key, buf.data_ptr()):
                raise TmpdiffError(f"{name}: TensorRT refused the address of {key}")
        self._bound = bound  # keeps the buffers alive while their addresses are bound

    def _shape_range(self, name: str) -> tuple[tuple, tuple]:
        """The smallest and largest shape an input takes: its optimization profile's, or its fixed shape in a plan
        built without one."""
        try:
            low, _, high = (tuple(d) for d in self._engine.get_tensor_profile_shape(name, 0))
            return low, high
        except (RuntimeError, TypeError, ValueError):  # no profile for a static input
            fixed = tuple(self._engine.get_tensor_shape(name))
            return fixed, fixed

    def layer_information(self) -> list[dict]:
        """The engine inspector's layer list (JSON records: name, type, precisions, tactic and, from TensorRT's ONNX
        parser, the ONNX nodes each layer was built from in its metadata)."""
        import json

        self._require_open()
        info = self._engine.create_engine_inspector().get_engine_information(self._trt.LayerInformationFormat.JSON)
        layers = json.loads(info).get("Layers", [])
        return [layer if isinstance(layer, dict) else {"Name": layer} for layer in layers]

    def set_profiler(self, profiler: Any) -> None:
        """Attach a `tensorrt.IProfiler` (per-layer times of every later run); CUDA graphs are turned off, since a
        replayed graph reports no layers."""
        self._require_open()
        self.cuda_graph, self._graph = False, None
        self._context.profiler = profiler

    def run(self, stream: Stream) -> None:
        """Enqueue one inference on `stream` (no host synchronization). With `cuda_graph`, the first run
        after `bind` launches normally and then captures a graph (a one-off device synchronization) that
        later runs replay."""
        self._require_open()
        if self._bound is None:
            raise TmpdiffError(f"TensorRT {self.precision} engine: run() before bind()")
        torch_stream = _torch_stream(stream, self._device_index)
        if torch_stream.device.index != self._device_index:  # TensorRT would launch on another GPU's stream
            raise TmpdiffError(f"TensorRT {self.precision} engine runs on {self.device}, the stream is on "
                               f"{torch_stream.device}: run it on a stream of its GPU (runtime_stream(engine.device))")
        if self._graph is not None:
            with torch.cuda.stream(torch_stream):
                self._graph.replay()
            return
        with torch.cuda.device(self._device_index):
            self._execute(torch_stream.cuda_stream)
            if self.cuda_graph:
                self._capture(torch_stream)

    def unbind(self) -> None:
        """Forget the bound buffers and the graph captured on them (after queued launches finish: a replay may
        still read them); the plan stays loaded, and the next `bind` and run capture a new graph."""
        if self._engine is not None and (self._graph is not None or self._bound is not None):
            torch.cuda.synchronize(self._device_index)
        self._graph = None
        self._bound = None

    def close(self) -> None:
        """Unbind (waiting for queued launches: they may still use the activation memory and the graph), then
        release the context, engine and runtime and detach from the shared memory (freed with it when this engine was
        its only user)."""
        self.unbind()
        if self._memory is not None:
            self._memory.detach(self)
            self._memory = None
        self._context = None
        self._engine = None
        self._runtime = None

    def __enter__(self) -> TrtEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------

    def _require_open(self) -> Any:
        if self._engine is None:
            raise TmpdiffError(f"TensorRT {self.precision} engine is closed", self.path)
        return self._engine

    def _execute(self, handle: int) -> None:
        trt_logger(self._trt).take_errors()  # a failed enqueue names its own error, not an earlier call's
        if not self._context.execute_async_v3(int(handle)):
            raise TmpdiffError(f"TensorRT {self.precision} engine failed to enqueue "
                               f"({first_error(trt_logger(self._trt).take_errors(), 'no error was logged')})", self.path)

    def _capture(self, torch_stream: torch.cuda.Stream) -> None:
        if torch_stream == torch.cuda.default_stream(self._device_index):
            # The legacy default stream cannot be captured; the runtime launches on its own stream, a caller may not.
            log.warning("TensorRT %s engine: no CUDA graph on the default stream; running without one", self.precision)
            self.cuda_graph = False
            return
        graph = torch.cuda.CUDAGraph()
        ok, reason, begun = False, "enqueue failed during capture", False
        torch_stream.synchronize()  # capture starts from an idle stream (a one-off wait, after the warm-up run)
        with torch.cuda.stream(torch_stream):
            try:
                # thread_local: other threads' CUDA calls do not invalidate this capture (as trtexec captures).
                graph.capture_begin(capture_error_mode="thread_local")
                begun = True
                ok = bool(self._context.execute_async_v3(int(torch_stream.cuda_stream)))
            except RuntimeError as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            finally:
                if begun:  # always end a capture that began, or the stream stays in capture mode
                    try:
                        graph.capture_end()
                    except RuntimeError as exc:
                        ok, reason = False, str(exc).strip().splitlines()[0] or type(exc).__name__
        if not ok:
            # Some engines cannot be captured (e.g. data-dependent shapes); they keep launching normally.
            log.warning("TensorRT %s engine: CUDA graph capture failed (%s); running without a graph", self.precision, reason)
            self.cuda_graph = False
            return
        self._graph = graph

    @property
    def graph_active(self) -> bool:
        """True once a CUDA graph has been captured and later runs replay it."""
        return self._graph is not None

    def _use_device_memory(self, memory: SharedDeviceMemory) -> None:
        self._memory = memory
        self._graph = None
        self._context.set_device_memory(memory.address, memory.size)

    def _io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        trt, engine = self._trt, self._engine
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = engine.get_tensor_dtype(name)
            member = getattr(dtype, "name", str(dtype)).split(".")[-1]
            if member not in _DTYPE_NAMES:  # FP8, INT4, FP4 I/O: the project's graphs keep theirs fp32 behind casts
                raise TmpdiffError(f"the plan's {name} is {member}: tmpdiff binds float32/16, bfloat16 and integer "
                                   f"tensors only; {REBUILD_HINT} from the build's graph", self.path)
            dtype_name = _DTYPE_NAMES[member]
            # Dynamic axes (-1) get names so check_buffers accepts any size there; axis 0 is the batch axis.
            shape = tuple(d if d >= 0 else ("batch" if j == 0 else f"dim{j}") for j, d in enumerate(engine.get_tensor_shape(name)))
            spec = TensorSpec(name, dtype_name, shape)
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
        return inputs, outputs

    def _check_specs(self, kind: str, given: list[TensorSpec], found: list[TensorSpec]) -> list[TensorSpec]:
        """The manifest's specs, after checking the plan has the same tensors, dtypes and ranks."""
        by_name = {s.name: s for s in found}
        if sorted(by_name) != sorted(s.name for s in given):
            raise TmpdiffError(f"plan {kind}s {sorted(by_name)} differ from the model's {sorted(s.name for s in given)}; "
                               f"{REBUILD_HINT}", self.path)
        for spec in given:
            have = by_name[spec.name]
            if have.dtype != spec.dtype or len(have.shape) != len(spec.shape):
                raise TmpdiffError(f"plan {kind} {spec.name} is {have.dtype}{list(have.shape)}, the model's is "
                                   f"{spec.dtype}{list(spec.shape)}; {REBUILD_HINT}", self.path)
        return list(given)
