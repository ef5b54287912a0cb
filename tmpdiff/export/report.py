"""Terminal tables for `tmpdiff export`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tmpdiff.export.exporter import ExportOutcome
from tmpdiff.formats.manifest import PrecisionEntry
from tmpdiff.formats.precisions import get_precision

_console = Console(width=160)  # wide enough that status and paths are never cut, also when piped


def print_export_table(outcomes: list[ExportOutcome]) -> None:
    """One row per precision: status, time, parity vs torch, error vs the reference torch model, quantized-node census."""
    table = Table(title="export")
    for column in ("precision", "status", "seconds", "ORT vs torch", "error vs reference", "GEMMs", "W quantized",
                   "A quantized", "graph"):
        table.add_column(column, justify="right" if column not in ("precision", "status", "graph") else "left")
    over_tolerance = False
    for o in outcomes:
        e = o.entry
        census = e.quantization.get("census", {}) if e else {}
        over = e is not None and e.parity_error > get_precision(o.precision).parity_tolerance
        over_tolerance |= over
        table.add_row(
            o.precision, "up to date" if o.skipped else "exported", f"{o.seconds:.1f}",
            f"{e.parity_error:.1e}{' *' if over else ''}" if e else "", _error(e) if e else "",
            str(census.get("gemm_nodes", "")), str(census.get("weight_quantized", "")),
            str(census.get("input_quantized", "")), str(o.onnx_path),
        )
    if over_tolerance:  # accepted by `exporter.parity_ok`: a share of the quantization error, the same quality
        table.caption = ("* above the precision's parity tolerance; accepted because its error vs the reference is "
                         "within 15% of torch's own and its distance from torch is a share of that error allowed by "
                         "exporter.parity_ok (int8/fp8: rounding ties, up to 1.5x that error)")
    _console.print(table)


def _error(entry: PrecisionEntry) -> str:
    """The error against the torch model the precision was made from (fp32 unless it was loaded in 16 bits)."""
    return f"{entry.error_vs_fp32:.2e}" + ("" if entry.reference_dtype == "float32" else f" vs {entry.reference_dtype}")


def print_census(outcome: ExportOutcome) -> None:
    """Every MatMul/Gemm/Conv of a quantized precision's TensorRT graph and its quantized operands."""
    if not outcome.census_rows:
        return
    table = Table(title=f"{outcome.precision}: TensorRT graph census")
    for column in ("module", "op", "input Q/DQ", "weight Q/DQ"):
        table.add_column(column)
    for row in outcome.census_rows:
        table.add_row(row.module, row.op, "yes" if row.input_quantized else "-", "yes" if row.weight_quantized else "-")
    _console.print(table)
