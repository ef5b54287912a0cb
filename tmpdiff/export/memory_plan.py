"""Peak memory of an export, planned before any work: a model of bytes per parameter per stage, and the refusal.

Every export stage holds the loaded model plus some number of copies of its weights (the traced module, the ONNX
proto, a graph being rewritten, AutoCast's working copies, ONNX Runtime's session in the parity check):
peak ~= BASE_BYTES + copies x the loaded model's weight bytes. The copies were measured with `scripts/bench_scale.py`
(peak RSS of one `tmpdiff export` process per precision; ru_maxrss is in KiB, so the recorded figures are GiB and
are converted to GB, 1e9 bytes, here; results/cpu-*-2core/scale.json):
- fp32 (plain): SD1.5-size UNet (860M parameters, 3.44 GB of fp32 weights) 15.8 GiB -> 4.6 copies (measured before
  the traced weights were streamed, so an upper bound);
- quantized from fp32 (int8, fp8): SD1.5 int8 10.9 GiB -> 3.1 copies (a quantized export frees the torch model once
  it is traced); PixArt-Sigma (611M) int8 / fp8 8.9 / 9.2 GiB -> 3.5 / 3.6: the plan is the larger;
- int4 (AWQ) from fp32: SD1.5 16.3 GiB -> 4.8 copies, PixArt 3.3. AWQ-lite keeps no activations (per-channel means
  and a loss per alpha); what differs from an int8 export is the bytes of the graphs the later stages hold. int4 is
  W4A16, a GEMM format: its graphs carry GEMM weights at half a byte, where int8 carries one, and convolution kernels
  at the twin's float (4 bytes: the twin computes in fp32 outside its quantized weights, `export.upcast`), where int8
  carries one. Per parameter that is 3 c - 0.5 (1 - c) bytes more than int8, for a kernel share c
  (`conv_fraction`, from the headers: SD1.5 0.685, SDXL 0.130, PixArt and SD3-medium 0.000). SD1.5's int4 peak is
  (4.8 - 3.1) / (1.90 / 4) = 3.6 bytes of peak per byte of that difference (INT4_GRAPH_COPIES); PixArt's int4 peaked
  below its int8 (3.3 vs 3.5 copies), as its negative difference says, but a negative difference is not planned
  below the quantized copies. Measured from 16 bits (2 calibration batches): SD3-medium 14.74 GiB -> 3.55 copies
  (planned 3.7), the SDXL-size UNet 18.77 GiB -> 3.73 while writing its twin, 0.23 above its int8 (3.5) where the
  graph bytes say -0.02: the int4 extra from 16 bits is never planned below those 0.23 copies (INT4_MIN_EXTRA). So
  int4 from 16 bits: SD3-medium and SDXL 3.9 copies, SD1.5 from fp32 5.3.
- fp16 from a 16-bit model: SD3-medium-size transformer (2.08B, 4.17 GB of fp16 weights) 13.8 / 14.1 GiB (two
  machines) and SDXL-size UNet (2.57B) 16.75 GiB -> 3.3-3.4 copies;
- quantized from a 16-bit model: SD3-medium int8 / fp8 19.5 GiB -> 4.8 copies while AutoCast converted the TensorRT
  graph with its quantized weights (that conversion was the peak); with them held out (`export.half`) int8 peaked at
  15.2 GiB -> 3.7 copies; the SDXL-size UNet (2.57B) fp8 at 21.4 GiB -> 4.3 while ONNX Runtime ran the 16-bit graphs
  in the parity checks with every weight dequantized at once, and at 17.6 GiB -> 3.5 once those checks ran in
  priority order (`engines.ort.session_options`; its peak moved to the graph rewrites); its int8 at 21.6 GiB with the
  priority order alone (ONNX Runtime's CPU arena kept each parity run's dequantized weights) and at 17.7 GiB -> 3.5
  with the arena off for those checks: the plan is the larger, 3.7.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from tmpdiff.engines import memory as engine_memory
from tmpdiff.formats.atomic import parse_json_object
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.precisions import Precision

GB = 1e9
BASE_BYTES = 1.0 * GB  # the interpreter with torch, diffusers, modelopt and ONNX Runtime imported
# Peak RSS in units of the loaded model's weight bytes, per kind of export and the dtype the model is loaded in
# (see the module docstring).
COPIES = {("plain", "float32"): 4.6, ("fp16", "float32"): 3.4, ("fp16", "float16"): 3.4,
          ("quantized", "float32"): 3.6, ("quantized", "float16"): 3.7}
# int4: peak bytes per byte its graphs hold beyond an int8 export's (SD1.5; see the module docstring)
INT4_GRAPH_COPIES = (4.8 - 3.1) / ((3 * 0.685 - 0.5 * (1 - 0.685)) / 4)
# the least extra over the quantized copies an int4 export is planned with (SDXL from 16 bits: 3.73 - 3.5)
INT4_MIN_EXTRA = {"float32": 0.0, "float16": 3.73 - 3.5}
BYTES_PER_WEIGHT = {"float32": 4, "float16": 2}


@dataclass(frozen=True)
class ExportMemory:
    """What one precision's export is planned to need, starting from the model loaded in `base` dtype."""

    precision: str
    parameters: int
    base: str
    copies: float
    peak_bytes: float

    def describe(self) -> str:
        return (f"{self.precision} needs about {_size(self.peak_bytes)} ({self.copies:.1f} x the "
                f"{_size(self.parameters * BYTES_PER_WEIGHT[self.base])} of {self.base} weights of "
                f"{self.parameters / 1e6:,.1f}M parameters + {_size(BASE_BYTES)})")


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.0f} MB"


def export_kind(precision: str) -> str:
    """The kind of export a precision takes: plain (fp32), fp16, quantized (int8, fp8) or int4."""
    from tmpdiff.formats.precisions import get_precision

    spec = get_precision(precision)
    if spec.name == "int4":
        return "int4"
    if spec.modelopt_cfg is not None:
        return "quantized"
    return "fp16" if spec.name == "fp16" else "plain"


def int4_graph_bytes_over_int8(conv_share: float) -> float:
    """Bytes per parameter the int4 graphs hold beyond the int8 ones: GEMM weights 0.5 instead of 1 byte, convolution
    kernels at the twin's fp32 instead of 1 byte."""
    return 3 * conv_share - 0.5 * (1 - conv_share)


def copies(precision: str, base: str, conv_share: float) -> float:
    """Planned peak in units of the loaded weights' bytes, for a model whose weights are `conv_share` conv kernels."""
    kind = export_kind(precision)
    if kind == "int4":
        extra = INT4_GRAPH_COPIES * int4_graph_bytes_over_int8(conv_share) / BYTES_PER_WEIGHT[base]
        return COPIES[("quantized", base)] + max(INT4_MIN_EXTRA[base], extra)
    return COPIES[(kind, base)]


def tensor_shapes(model_dir: Path) -> dict[str, list[int]]:
    """The shape of every tensor in the safetensors files a diffusers model directory's model is loaded from
    (`loaded_safetensors`: not a variant lying beside the plain weights), by name, from their headers."""
    from tmpdiff.models.loading import loaded_safetensors

    shapes = {}
    for file in loaded_safetensors(model_dir):
        shapes |= _header_shapes(file, _read_header(file))
    return shapes


def _read_header(file: Path) -> dict:
    """A safetensors file's JSON header: its length (the first 8 bytes) bounded by the file's size, a JSON object."""
    try:
        with file.open("rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            available = os.fstat(handle.fileno()).st_size - 8
            if size > available:
                raise TmpdiffError(f"not a readable safetensors header (it claims {size} bytes, the file holds "
                                   f"{available} after its length)", file)
            data = handle.read(size)
    except (struct.error, OSError) as exc:
        raise TmpdiffError(f"not a readable safetensors header ({exc})", file) from None
    return parse_json_object(data, file, "not a readable safetensors header: ")


def _header_shapes(file: Path, header: dict) -> dict[str, list[int]]:
    """Tensor name -> shape from a header; an entry without a list of non-negative integers as its shape is refused."""
    shapes = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
            raise TmpdiffError(f"not a readable safetensors header (tensor {key!r}: shape {shape!r} is not a list of "
                               "non-negative integers)", file)
        shapes[key] = shape
    return shapes


def _parameters(shapes: dict[str, list[int]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def _kernel_share(shapes: dict[str, list[int]]) -> float:
    total = _parameters(shapes)
    kernels = sum(math.prod(shape) for name, shape in shapes.items() if name.endswith(".weight") and len(shape) >= 3)
    return kernels / total if total else 0.0


def parameter_count(model_dir: Path) -> int:
    """Parameters in a diffusers model directory, from its safetensors headers (no weights read)."""
    return _parameters(tensor_shapes(model_dir))


def conv_fraction(model_dir: Path) -> float:
    """The share of the parameters that are convolution kernels (`*.weight` tensors of 3 or more dimensions; a
    positional table such as SD3's `pos_embed.pos_embed`, 1 x 36864 x 1536, is not one), from the headers."""
    return _kernel_share(tensor_shapes(model_dir))


def weight_census(model_dir: Path) -> tuple[int, float]:
    """Parameters and their share of convolution kernels (`conv_fraction`), from one read of the headers."""
    shapes = tensor_shapes(model_dir)
    return _parameters(shapes), _kernel_share(shapes)


def plan_export(model_dir: Path, specs: list[Precision], base: str = "float32") -> list[ExportMemory]:
    """The planned peak of each precision's export of the model in `model_dir`, loaded in `base` dtype."""
    params, share = weight_census(model_dir)
    weights = params * BYTES_PER_WEIGHT[base]
    plans = []
    for spec in specs:
        factor = copies(spec.name, base, share)
        plans.append(ExportMemory(spec.name, params, base, factor, BASE_BYTES + factor * weights))
    return plans


LOAD_DTYPES = ("auto", "float32", "float16")


def choose_base(model_dir: Path, specs: list[Precision], available: int | None = None, requested: str = "auto",
                memory_check: bool = True) -> str:
    """The dtype the model is loaded in for this export.

    `requested` "auto": float32 (the reference every precision is checked against) when its planned peak fits the
    memory available, else float16 when every precision can be made from a 16-bit model (all but fp32) and fits that
    way; "float32" / "float16" as asked (a 16-bit checkpoint quantized as it ships). Without `memory_check` nothing is
    planned. A plan that does not fit is a TmpdiffError with the numbers, before anything is loaded."""
    if requested not in LOAD_DTYPES:
        raise TmpdiffError(f"unknown --load-dtype {requested!r} (known: {', '.join(LOAD_DTYPES)})")
    if requested == "float16" and any(spec.name == "fp32" for spec in specs):
        raise TmpdiffError("fp32 cannot be exported from a model loaded in float16: export it separately with "
                           "--load-dtype float32 (or auto)", model_dir)
    if not memory_check:
        return "float32" if requested == "auto" else requested
    available = engine_memory.available_bytes() if available is None else available
    candidates = [requested] if requested != "auto" else ["float32"] + (
        ["float16"] if all(spec.name != "fp32" for spec in specs) else [])
    for base in candidates:
        if available is None or all(plan.peak_bytes <= available for plan in plan_export(model_dir, specs, base)):
            return base
    base = candidates[-1]
    worst = max(plan_export(model_dir, specs, base), key=lambda plan: plan.peak_bytes)
    from tmpdiff.formats.precisions import get_precision

    hint = ""
    if base == "float32" and requested == "auto":  # fp32 among the precisions kept the 16-bit load out
        rest = [spec for spec in specs if spec.name != "fp32"] or [get_precision("fp16")]
        half = max(plan.peak_bytes for plan in plan_export(model_dir, rest, "float16"))
        if half <= available:
            names = ",".join(spec.name for spec in rest)
            hint = f"--precisions {names} fits from the 16-bit model ({_size(half)}); "
    raise TmpdiffError(
        f"not enough memory to export: {worst.describe()}, {_size(available)} is available; {hint}export on a machine "
        f"with at least {_size(worst.peak_bytes)} free, or pass --no-memory-check to try anyway", model_dir)
