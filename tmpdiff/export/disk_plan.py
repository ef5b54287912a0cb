"""Disk an export writes, planned before each precision's work: bytes per parameter, measured, and the refusal.

Per precision the export writes its graphs into the build dir (the ORT twin and, for quantized precisions, the
TensorRT graph, each with its `.data`; staged beside their targets and renamed, so the old files of a re-export stay
until the new ones are whole) and, while it works, the traced graph into the system temp dir (the loaded model's
weight bytes; quantized exports also hold their quantized weights there while AutoCast converts the TensorRT graph).
Bytes written per parameter, from the graph files `scripts/bench_scale.py` recorded (results/cpu-*-2core/scale.json):
fp32 4.0 (SD1.5-size UNet, PixArt-Sigma); fp16 2.0 (SDXL; SD3-medium on the EPYC) - 2.06 (SD3-medium on the Xeon, an
earlier export that wrote its 1 x 36864 x 1536 positional table in fp32: exactly the 113 MB more), planned 2.1;
int8/fp8 from fp32 2.0-2.1 (SD1.5, PixArt), planned 2.2; int8/fp8 from a 16-bit load 2.0 (SDXL fp8) - 2.8 (SD3-medium
int8 before its twin was made fp32: `export.upcast`), planned 3.7: an int8 twin from 16 bits holds its unquantized
weights in fp32 (SD3-medium: 1.2B quantized, 0.9B not -> 1.2 + 3.5 GB twin + 1.2 + 1.7 GB TensorRT graph, computed,
not measured).
int4 (W4A16: GEMMs only) is planned per kind of parameter, from the share of convolution kernels in the safetensors
headers (`memory_plan.conv_fraction`: SD1.5 0.685, SDXL 0.130, PixArt and SD3-medium 0): a kernel is written at
fp32 in the twin and 16 bits in the TensorRT graph, 6 bytes (SD1.5's 4.48 measured, its other parameters at PixArt's
1.21, gives 5.98); every other parameter at 2.9, the most measured for a model without kernels (SD3-medium from 16
bits, 2.83: the twin holds its unquantized GEMMs in fp32; PixArt from fp32 wrote 1.21, SDXL's non-kernel parameters
1.08). Planned against measured: SD1.5 5.0 / 4.48, SDXL 3.3 / 1.72, PixArt 2.9 / 1.21, SD3-medium 2.9 / 2.83.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tmpdiff.export.memory_plan import BYTES_PER_WEIGHT, export_kind
from tmpdiff.formats.disk_space import require_free_space
from tmpdiff.formats.precisions import Precision

WRITTEN_BYTES_PER_PARAMETER = {("plain", "float32"): 4.0, ("fp16", "float32"): 2.1, ("fp16", "float16"): 2.1,
                               ("quantized", "float32"): 2.2, ("quantized", "float16"): 3.7}
INT4_KERNEL_BYTES = 6.0  # a convolution kernel: fp32 in the twin, 16 bits in the TensorRT graph
INT4_OTHER_BYTES = 2.9  # any other parameter (the most measured for a model without kernels: SD3-medium, 2.83)
HELD_QUANTIZED_BYTES = 1.0  # AutoCast's hold: at most one byte per quantized weight


def written_bytes(spec: Precision, parameters: int, base: str, conv_share: float) -> float:
    """Bytes the precision's graphs take in the build dir, for a model whose weights are `conv_share` conv kernels."""
    kind = export_kind(spec.name)
    if kind == "int4":
        return (INT4_KERNEL_BYTES * conv_share + INT4_OTHER_BYTES * (1 - conv_share)) * parameters
    return WRITTEN_BYTES_PER_PARAMETER[(kind, base)] * parameters


def scratch_bytes(spec: Precision, parameters: int, base: str) -> float:
    """Bytes the precision's export holds in the system temp dir while it works."""
    traced = parameters * BYTES_PER_WEIGHT[base]
    return traced + (HELD_QUANTIZED_BYTES * parameters if spec.rewrite_kind is not None else 0.0)


def require_export_space(spec: Precision, parameters: int, base: str, conv_share: float, build_dir: Path) -> None:
    """Refuse the precision's export, before its work, when the build dir's or the temp dir's filesystem (summed if
    they are one) has no room for what it is planned to write."""
    require_free_space(
        [(build_dir, written_bytes(spec, parameters, base, conv_share), f"{spec.name}'s graphs"),
         (Path(tempfile.gettempdir()), scratch_bytes(spec, parameters, base), "the traced graph (temp dir)")],
        f"the {spec.name} export of {parameters / 1e6:,.1f}M parameters",
        "free space, point TMPDIR elsewhere for the temp files, or pass --no-memory-check to try anyway")
