"""Disk an export writes, planned before each precision's work: bytes per parameter, measured, and the refusal.

Per precision the export writes its graphs into the build dir (the ORT twin and, for quantized precisions, the
TensorRT graph, each with its `.data`; staged beside their targets and renamed, so the old files of a re-export stay
until the new ones are whole) and, while it works, the traced graph into the system temp dir (the loaded model's
weight bytes; quantized exports also hold their quantized weights there while AutoCast converts the TensorRT graph).
Bytes written per parameter, from the graph files `scripts/bench_scale.py` recorded (results/cpu-*-2core/scale.json):
fp32 4.0 (SD1.5-size UNet, PixArt-Sigma); fp16 2.0 (SD3-medium, SDXL); int8/fp8 from fp32 2.0-2.1 (SD1.5, PixArt),
planned 2.2; int8/fp8 from a 16-bit load 2.0 (SDXL fp8) - 2.8 (SD3-medium int8 before its twin was made fp32:
`export.upcast`), planned 3.7: an int8 twin from 16 bits holds its unquantized weights in fp32 (SD3-medium: 1.2B
quantized, 0.9B not -> 1.2 + 3.5 GB twin + 1.2 + 1.7 GB TensorRT graph, computed, not measured); int4 from fp32 1.2
(PixArt) - 4.5 (SD1.5: its convolutions stay fp32 in both graphs), planned 4.6, also from a 16-bit load (measured
2.8 for SD3-medium, whose unquantized GEMMs the twin holds in fp32, and 1.7 for SDXL: over-planned there).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tmpdiff.export.memory_plan import BYTES_PER_WEIGHT, export_kind
from tmpdiff.formats.disk_space import require_free_space
from tmpdiff.formats.precisions import Precision

WRITTEN_BYTES_PER_PARAMETER = {("plain", "float32"): 4.0, ("fp16", "float32"): 2.0, ("fp16", "float16"): 2.0,
                               ("quantized", "float32"): 2.2, ("quantized", "float16"): 3.7,
                               ("int4", "float32"): 4.6, ("int4", "float16"): 4.6}
HELD_QUANTIZED_BYTES = 1.0  # AutoCast's hold: at most one byte per quantized weight


def written_bytes(spec: Precision, parameters: int, base: str) -> float:
    """Bytes the precision's graphs take in the build dir."""
    return WRITTEN_BYTES_PER_PARAMETER[(export_kind(spec.name), base)] * parameters


def scratch_bytes(spec: Precision, parameters: int, base: str) -> float:
    """Bytes the precision's export holds in the system temp dir while it works."""
    traced = parameters * BYTES_PER_WEIGHT[base]
    return traced + (HELD_QUANTIZED_BYTES * parameters if spec.rewrite_kind is not None else 0.0)


def require_export_space(spec: Precision, parameters: int, base: str, build_dir: Path) -> None:
    """Refuse the precision's export, before its work, when the build dir's or the temp dir's filesystem (summed if
    they are one) has no room for what it is planned to write."""
    require_free_space(
        [(build_dir, written_bytes(spec, parameters, base), f"{spec.name}'s graphs"),
         (Path(tempfile.gettempdir()), scratch_bytes(spec, parameters, base), "the traced graph (temp dir)")],
        f"the {spec.name} export of {parameters / 1e6:,.1f}M parameters",
        "free space, point TMPDIR elsewhere for the temp files, or pass --no-memory-check to try anyway")
