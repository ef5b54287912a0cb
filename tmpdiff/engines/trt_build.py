"""Native TensorRT plans: build options, optimization-profile shapes, and `build_trt_engine`.

Everything except `build_trt_engine`, `load_tensorrt` and `cuda_device` is pure Python and runs without
TensorRT or a GPU (plan names, profile shapes, the precision / compute-capability table, and the
equivalent `trtexec` / `polygraphy convert` command lines). `tensorrt` is imported only when a plan is
built or loaded, so `import tmpdiff.engines.trt_build` works on any machine.

Written against the TensorRT 10 Python API (`TENSORRT_VERSION` is the pin; the `gpu` extra allows tensorrt>=10.8,<11).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tmpdiff.formats.atomic import sha256_file, write_bytes
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import EngineEntry
from tmpdiff.formats.precisions import get_precision
from tmpdiff.formats.specs import TensorSpec

log = logging.getLogger("tmpdiff.trt")

BATCH_AXIS = "batch"
REBUILD_HINT = "rebuild it with `tmpdiff build --backend trt`"


# The TensorRT every GPU check and build of this project is run with: plans load only on the exact version that built
# them, so results from two machines compare only under one pin (the newest TensorRT 10 on PyPI on 2026-12-07).
TENSORRT_VERSION = "10.16.1.11"


def tensorrt_requirement(torch_cuda: str | None) -> str | None:
    """The pinned TensorRT wheel for a torch built against CUDA `torch_cuda` ("12.8"): `tensorrt-cu12` /
    `tensorrt-cu13` (the plain `tensorrt` metapackage installs the CUDA 13 variant whatever torch uses, which needs a
    recent driver and does not load beside a CUDA 12 torch). None for a CPU torch or another CUDA major: no TensorRT
    wheel fits it, a CUDA 12/13 build of torch comes first."""
    major = (torch_cuda or "").split(".")[0]
    return f"tensorrt-cu{major}=={TENSORRT_VERSION}" if major in ("12", "13") else None


def not_installed() -> str:
    """What to do when TensorRT is missing: install the wheel of this torch's CUDA version."""
    import torch

    requirement = tensorrt_requirement(torch.version.cuda)
    if requirement is None:
        return (f"TensorRT is not installed, and torch here is {torch_build()}: install a CUDA 12 or 13 build of torch "
                f"{torch.__version__.split('+')[0]} first, then the TensorRT wheel of its CUDA version")
    return (f"TensorRT is not installed: pip install '{requirement}' on a machine with an NVIDIA GPU (the wheel of "
            "torch's CUDA major version; TMPDIFF_GPU_INSTALL=1 scripts/gpu_check.sh does it)")


def torch_build() -> str:
    """What torch here was built for: 'a CPU build' or 'built for CUDA 12.8'."""
    import torch

    return "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"

_ARCHITECTURES = {(7, 5): "Turing", (8, 0): "Ampere", (8, 9): "Ada", (10, 0): "Blackwell"}
BFLOAT16_CAPABILITY = (8, 0)  # bfloat16 kernels: Ampere and later


class ProfileShape(NamedTuple):
    """min / opt / max shape of one input in the optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def is_static(self) -> bool:
        return self.min == self.opt == self.max


ProfileShapes = dict[str, ProfileShape]


@dataclass(frozen=True)
class TrtBuildOptions:
    """How a plan is built. Static shapes by default; `dynamic` opens the batch axis to min_batch..max_batch."""

    batch: int = 1
    dynamic: bool = False
    min_batch: int = 1
    max_batch: int | None = None  # dynamic only; None = `batch`
    dims: Mapping[str, int] = field(default_factory=dict)  # sizes of named axes other than "batch"
    optimization_level: int = 3  # TensorRT's default; 0..5
    workspace_bytes: int | None = None  # None = TensorRT's default (all device memory)
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise TmpdiffError(f"builder optimization level must be 0..5, got {self.optimization_level}")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise TmpdiffError(f"workspace must be a positive number of bytes, got {self.workspace_bytes}")


@dataclass(frozen=True)
class CudaDevice:
    """The GPU a plan is built for or loaded on."""

    index: int
    name: str
    compute_capability: str  # "8.9"


# ---------------------------------------------------------------------------------------------------
# Pure helpers (no tensorrt import)
# ---------------------------------------------------------------------------------------------------


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as "10.8.0.43"."""
    match = re.match(r"^\s*(\d+)\.(\d+)", version)
    if not match:
        raise TmpdiffError(f"not a TensorRT version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def plan_file_name(version: str) -> str:
    """File name of a plan built by TensorRT `version`: engine_trt{major}.{minor}.plan."""
    major, minor = parse_version(version)
    return f"engine_trt{major}.{minor}.plan"


def parse_compute_capability(text: str) -> tuple[int, int]:
    """(major, minor) of a compute capability string such as "8.9"."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    if not match:
        raise TmpdiffError(f"not a compute capability: {text!r} (expected e.g. '8.9')")
    return int(match.group(1)), int(match.group(2))


def check_precision_supported(precision: str, compute_capability: str, gpu_name: str | None = None) -> None:
    """Refuse a precision the GPU cannot run (fp8 < 8.9, int4 < 8.0, nvfp4 < 10.0, anything < 7.5)."""
    need = get_precision(precision).min_compute_capability  # unknown names list the known ones
    have = parse_compute_capability(compute_capability)
    if have < need:
        arch = _ARCHITECTURES.get(need)
        gpu = f"{gpu_name} has" if gpu_name else "this GPU has"
        raise TmpdiffError(
            f"{precision} needs a GPU with compute capability {need[0]}.{need[1]} or newer"
            f"{f' ({arch} or later)' if arch else ''}; {gpu} {have[0]}.{have[1]}"
        )


def profile_shapes(specs: Iterable[TensorSpec], batch: int, *, dynamic: bool = False, min_batch: int = 1,
                   max_batch: int | None = None, dims: Mapping[str, int] | None = None) -> ProfileShapes:
    """Optimization-profile shapes of every input: min = opt = max = `batch` when static,
    min_batch / batch / max_batch on the "batch" axis when `dynamic`. Other named axes take `dims`."""
    if batch < 1:
        raise TmpdiffError(f"batch must be at least 1, got {batch}")
    if dynamic:
        top = batch if max_batch is None else max_batch
        if not 1 <= min_batch <= batch <= top:
            raise TmpdiffError(f"dynamic batch range must satisfy 1 <= min <= batch <= max; got {min_batch} / {batch} / {top}")
        low = min_batch
    else:
        if max_batch is not None and max_batch != batch:
            raise TmpdiffError("max_batch applies to dynamic engines only; pass dynamic=True or drop max_batch")
        low = top = batch
    fixed = {k: v for k, v in (dims or {}).items() if k != BATCH_AXIS}
    shapes: ProfileShapes = {}
    for spec in specs:
        shapes[spec.name] = ProfileShape(spec.concrete({**fixed, BATCH_AXIS: low}), spec.concrete({**fixed, BATCH_AXIS: batch}),
                                         spec.concrete({**fixed, BATCH_AXIS: top}))
    return shapes


def options_profile(specs: Iterable[TensorSpec], options: TrtBuildOptions) -> ProfileShapes:
    """`profile_shapes` for a set of build options."""
    return profile_shapes(specs, options.batch, dynamic=options.dynamic, min_batch=options.min_batch,
                          max_batch=options.max_batch, dims=options.dims)


def _dynamic_inputs(specs: Iterable[TensorSpec], shapes: ProfileShapes) -> list[str]:
    """Inputs with a named axis: the ones an optimization profile describes (trtexec rejects shapes for static inputs)."""
    names = [s.name for s in specs if any(isinstance(d, str) for d in s.shape)]
    missing = [n for n in names if n not in shapes]
    if missing:
        raise TmpdiffError(f"no profile shape for input(s) {', '.join(missing)}")
    return names


def _trtexec_dims(dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in dims) if dims else "scalar"


def _trtexec_name(name: str) -> str:
    # trtexec splits the spec on ':'; names containing one are wrapped in single quotes.
    return f"'{name}'" if ":" in name else name


def trtexec_command(onnx_path: str | Path, plan_path: str | Path, specs: Iterable[TensorSpec], shapes: ProfileShapes,
                    options: TrtBuildOptions, executable: str = "trtexec") -> str:
    """A `trtexec` command line that builds the same plan (strongly typed, no TF32, same profile, level, workspace, and
    detailed layer information, which `layer-costs --backend trt` and the GPU check's kernel census read)."""
    specs = list(specs)
    args = [executable, f"--onnx={onnx_path}", f"--saveEngine={plan_path}", "--stronglyTyped"]
    names = _dynamic_inputs(specs, shapes)
    if names:
        for flag, pick in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}=" + ",".join(f"{_trtexec_name(n)}:{_trtexec_dims(shapes[n][pick])}" for n in names))
    args.append(f"--builderOptimizationLevel={options.optimization_level}")
    args.append("--noTF32")  # fp32 tensors compute in fp32, as `build_trt_engine` builds them
    args.append("--profilingVerbosity=detailed")
    if options.workspace_bytes is not None:
        args.append(f"--memPoolSize=workspace:{options.workspace_bytes}B")
    if options.timing_cache is not None:
        args.append(f"--timingCacheFile={options.timing_cache}")
    args.append("--skipInference")
    return shlex.join(args)


def polygraphy_command(onnx_path: str | Path, plan_path: str | Path, specs: Iterable[TensorSpec], shapes: ProfileShapes,
                       options: TrtBuildOptions, executable: str = "polygraphy") -> str:
    """A `polygraphy convert` command line that builds the same plan (Polygraphy leaves TF32 off unless --tf32)."""
    specs = list(specs)
    args = [executable, "convert", str(onnx_path), "--convert-to", "trt", "--strongly-typed"]
    names = _dynamic_inputs(specs, shapes)
    if names:
        for flag, pick in (("--trt-min-shapes", 0), ("--trt-opt-shapes", 1), ("--trt-max-shapes", 2)):
            args.append(flag)
            args.extend(f"{n}:[{','.join(str(d) for d in shapes[n][pick])}]" for n in names)
    args += ["--builder-optimization-level", str(options.optimization_level), "--profiling-verbosity", "detailed"]
    if options.workspace_bytes is not None:
        args += ["--pool-limit", f"workspace:{options.workspace_bytes}"]
    if options.timing_cache is not None:
        args += ["--load-timing-cache", str(options.timing_cache), "--save-timing-cache", str(options.timing_cache)]
    args += ["-o", str(plan_path)]
    return shlex.join(args)


# ---------------------------------------------------------------------------------------------------
# TensorRT and CUDA access (imported lazily)
# ---------------------------------------------------------------------------------------------------


def load_tensorrt() -> Any:
    """The `tensorrt` module, or one clear TmpdiffError when it is missing or cannot load."""
    try:
        import tensorrt
    except ModuleNotFoundError as exc:
        if exc.name in (None, "tensorrt") or (exc.name or "").startswith("tensorrt"):
            raise TmpdiffError(not_installed()) from None
        raise TmpdiffError(f"TensorRT is installed but cannot be imported ({exc})") from None
    except (ImportError, OSError) as exc:  # e.g. libnvinfer or the CUDA driver library failed to load
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TmpdiffError(f"TensorRT is installed but cannot be loaded ({first})") from None
    if not hasattr(tensorrt, "Builder"):
        # PyPI's bare `tensorrt` stub installs without the real bindings on unsupported platforms.
        raise TmpdiffError(not_installed())
    return tensorrt


def cuda_device(device: int | str | None = None) -> CudaDevice:
    """Name and compute capability of a CUDA device; TmpdiffError when there is no NVIDIA GPU."""
    import torch

    if not torch.cuda.is_available():
        raise TmpdiffError("no NVIDIA GPU: the TensorRT backend needs CUDA, and torch.cuda.is_available() is False here")
    if device is None or device == "cuda":
        index = torch.cuda.current_device()
    else:
        dev = torch.device(device) if isinstance(device, str) else torch.device("cuda", device)
        if dev.type != "cuda":
            raise TmpdiffError(f"TensorRT runs on CUDA devices, not {device!r}")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise TmpdiffError(f"no CUDA device {index}; this machine has {torch.cuda.device_count()}")
    major, minor = torch.cuda.get_device_capability(index)
    return CudaDevice(index, torch.cuda.get_device_name(index), f"{major}.{minor}")


_LOGGER: Any = None


def trt_logger(trt: Any) -> Any:
    """The process-wide TensorRT logger (TensorRT keeps the first logger it sees): warnings go to
    `logging`, errors are also kept so a failed parse / build / deserialize can say why."""
    global _LOGGER
    if _LOGGER is None:

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    log.warning("TensorRT: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

            def take_errors(self) -> list[str]:
                errors, self.errors = self.errors, []
                return errors

        _LOGGER = _Logger()
    return _LOGGER


def first_error(errors: list[str], fallback: str) -> str:
    """The first logged TensorRT error, one line, for a TmpdiffError message."""
    for message in errors:
        line = message.strip().splitlines()[0] if message.strip() else ""
        if line:
            return line
    return fallback


# ---------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------


def _parse_onnx(trt: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any, Any]:
    """Builder, strongly typed network and parser for an ONNX file; parser errors name the file."""
    builder = trt.Builder(logger)
    # Strongly typed: tensor types come from the graph (its Q/DQ and casts), not from builder precision flags.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    logger.take_errors()
    if not parser.parse_from_file(str(onnx_path)):
        problems = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            where = f"node {err.node_name()!r} ({err.node_operator()}): " if err.node() >= 0 else ""
            problems.append(" ".join(f"{where}{err.desc()}".split()))  # one line: TmpdiffError prints as one
        detail = "; ".join(problems[:3]) or first_error(logger.take_errors(), "no parser error recorded")
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise TmpdiffError(f"TensorRT's ONNX parser rejected this graph: {detail}{more}", onnx_path)
    return builder, network, parser


def _network_profile(builder: Any, network: Any, specs: list[TensorSpec], shapes: ProfileShapes,
                     onnx_path: Path) -> Any | None:
    """The optimization profile for the network's dynamic inputs (None if every input is static)."""
    spec_names = {s.name for s in specs}
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        name, graph_shape = tensor.name, tuple(tensor.shape)
        if name not in shapes:
            raise TmpdiffError(f"graph input {name!r} has no profile shape (model inputs: {', '.join(sorted(spec_names))})",
                               onnx_path)
        want = shapes[name]
        if len(graph_shape) != len(want.opt):
            raise TmpdiffError(f"graph input {name!r} has rank {len(graph_shape)}, profile shape {want.opt}", onnx_path)
        if any(d < 0 for d in graph_shape):
            dynamic = True
            profile.set_shape(name, want.min, want.opt, want.max)
        elif not want.is_static or want.opt != graph_shape:
            raise TmpdiffError(f"graph input {name!r} has fixed shape {graph_shape}; requested {want.min}..{want.max}",
                               onnx_path)
    graph_names = {network.get_input(i).name for i in range(network.num_inputs)}
    extra = sorted(set(shapes) - graph_names)
    if extra:
        raise TmpdiffError(f"profile names input(s) the graph does not have: {', '.join(extra)}", onnx_path)
    return profile if dynamic else None


def _timing_cache(trt: Any, config: Any, path: Path | None) -> bool:
    """Attach a timing cache (loaded from `path` if it exists). True if an existing cache was reused."""
    if path is None:
        return False
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, False):
        return bool(blob)
    # A corrupt cache, or one from another GPU or TensorRT version, is refused; start empty rather than fail.
    log.warning("timing cache %s does not match this GPU / TensorRT; starting a new one", path)
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def build_trt_engine(onnx_path: str | Path, plan_dir: str | Path, specs: list[TensorSpec], shapes: ProfileShapes,
                     options: TrtBuildOptions, *, precision: str | None = None,
                     device: int | str | None = None, build_dir: Path | None = None,
                     layer_precisions: Sequence[str] | None = None, base: str | None = None) -> EngineEntry:
    """Build a strongly typed TensorRT plan from the TensorRT-flavoured ONNX graph of one precision (or of one
    deployed layer configuration: `precision` is its `mixed-...` name, `layer_precisions` what its layers run).

    `plan_dir` is the precision's directory inside the build dir (build/<model>/<precision>); the plan is
    written there atomically as engine_trt{major}.{minor}.plan. The returned EngineEntry's path is relative
    to `build_dir` (default: plan_dir's parent), like the manifest's ONNX paths; `precision` defaults to
    plan_dir's name. The timing cache, when given, is loaded if present and saved (atomically) afterwards.
    `base` is the 16-bit type the graph computes in outside its Q/DQ (the export's --trt-dtype); bfloat16 needs Ampere.
    """
    trt = load_tensorrt()
    gpu = cuda_device(device)
    onnx_path, plan_dir = Path(onnx_path), Path(plan_dir)
    precision = precision or plan_dir.name
    for level in sorted(set(layer_precisions or [precision])):
        check_precision_supported(level, gpu.compute_capability, gpu.name)
    if base == "bfloat16" and parse_compute_capability(gpu.compute_capability) < BFLOAT16_CAPABILITY:
        raise TmpdiffError(f"the {precision} TensorRT graph computes in bfloat16, which needs compute capability 8.0 or "
                           f"newer (Ampere or later); {gpu.name} has {gpu.compute_capability}: re-export with "
                           "--trt-dtype float16", onnx_path)
    if not onnx_path.is_file():
        raise TmpdiffError("ONNX file is missing; re-run `tmpdiff export`", onnx_path)

    import torch

    started = time.perf_counter()
    logger = trt_logger(trt)
    with torch.cuda.device(gpu.index):
        # The parser owns the parsed weights: it stays referenced until the plan is built.
        builder, network, _parser = _parse_onnx(trt, logger, onnx_path)
        config = builder.create_builder_config()
        config.builder_optimization_level = options.optimization_level
        # TF32 is on by default: fp32 GEMMs and convolutions would round their inputs to 10-bit mantissas, and an fp32
        # plan would not compute what its precision (and its parity with the fp32 ORT twin) says
        config.clear_flag(trt.BuilderFlag.TF32)
        # layer names and parameters (precisions, tactics) in the plan, for the engine inspector (`inspect_layers`)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if options.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
        profile = _network_profile(builder, network, specs, shapes, onnx_path)
        if profile is not None and config.add_optimization_profile(profile) < 0:
            raise TmpdiffError("TensorRT rejected the optimization profile (check min <= opt <= max)", onnx_path)
        reused_cache = _timing_cache(trt, config, options.timing_cache)
        logger.take_errors()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            reason = first_error(logger.take_errors(), "no error was logged")
            raise TmpdiffError(f"TensorRT could not build an engine from this graph ({reason})", onnx_path)
        plan = bytes(memoryview(serialized))
        if options.timing_cache is not None:
            write_bytes(options.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))

    plan_path = plan_dir / plan_file_name(trt.__version__)
    write_bytes(plan_path, plan)
    seconds = time.perf_counter() - started
    flags = {
        "strongly_typed": True,
        "tf32": False,
        "builder_optimization_level": options.optimization_level,
        "workspace_bytes": options.workspace_bytes,
        "dynamic": options.dynamic,
        "profile": {name: [list(s.min), list(s.opt), list(s.max)] for name, s in shapes.items()},
        "timing_cache": str(options.timing_cache) if options.timing_cache is not None else None,
        "timing_cache_reused": reused_cache,
        "gpu_name": gpu.name,
        "build_seconds": round(seconds, 3),
        "trtexec": trtexec_command(onnx_path, plan_path, specs, shapes, options),
    }
    return EngineEntry(
        backend="trt",
        precision=precision,
        path=plan_path.relative_to(build_dir or plan_dir.parent).as_posix(),
        sha256=hashlib.sha256(plan).hexdigest(),
        source_sha256=sha256_file(onnx_path),
        backend_version=trt.__version__,
        device="cuda",
        compute_capability=gpu.compute_capability,
        build_flags=flags,
    )
