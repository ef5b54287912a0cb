"""How far an honest quantized twin made from a 16-bit load is from its torch model, over calibration sets.

Exports the bundled DiT's quantized precisions with `--load-dtype float16` once per calibration seed set (each into
its own build under a scratch directory) and reads what the export recorded: the twin's parity to the fake-quant
torch model, the twin's and torch's errors vs the 16-bit reference, and their ratio, which the parity rule bounds
(`exporter.QUALITY`; `HALF_TIE_QUALITY` for int8/fp8 from 16-bit loads). Prints a table and writes JSON; an export the
rule refuses is recorded with its message.

    python scripts/bench_half_parity.py --out results/cpu-epyc-2core/half_parity.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from _code_version import code_version

from tmpdiff.commands.export import calibration_for
from tmpdiff.engines.device import device_label
from tmpdiff.export.exporter import HALF_TIE_QUALITY, QUALITY, export_model
from tmpdiff.formats.atomic import write_json
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.models.bundled import load_model_info

SEED_SETS = ["0", "1", "2", "3", "0,1", "1,2", "2,3", "0,2", "4,5", "0,1,2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--precisions", default="int8", help="comma-separated quantized precisions")
    parser.add_argument("--seed-sets", default=";".join(SEED_SETS), help="calibration seed sets, ';'-separated")
    args = parser.parse_args()
    model_dir = load_model_info().transformer_dir
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="half-parity-") as scratch:
        for i, seeds in enumerate(args.seed_sets.split(";")):
            seed_list = [int(s) for s in seeds.split(",")]
            row: dict = {"calib_seeds": seed_list}
            try:
                calibration, sampling = calibration_for(model_dir, seed_list, None)
                build_dir, _ = export_model(model_dir, Path(scratch), precisions, model_id=f"s{i}", load_dtype="float16",
                                            calibration=calibration, sampling=sampling)
            except TmpdiffError as exc:
                row["refused"] = str(exc)
                rows.append(row)
                print(f"seeds {seeds}: refused ({exc})")
                continue
            for precision in precisions:
                entry = load_manifest(build_dir).precisions[precision]
                ratio = entry.error_vs_fp32 / entry.torch_error_vs_fp32
                row[precision] = {"parity": entry.parity_error, "error": entry.error_vs_fp32,
                                  "torch_error": entry.torch_error_vs_fp32, "error_ratio": ratio,
                                  "parity_share": entry.parity_error / entry.torch_error_vs_fp32,
                                  "within_quality": abs(ratio - 1) <= QUALITY}
                print(f"seeds {seeds:8s} {precision}: parity {entry.parity_error:.3g}, error {entry.error_vs_fp32:.4g} "
                      f"vs torch {entry.torch_error_vs_fp32:.4g} (ratio {ratio:.3f})")
            rows.append(row)
    summary = {}
    for precision in precisions:
        ratios = [r[precision]["error_ratio"] for r in rows if precision in r]
        if ratios:
            summary[precision] = {"ratio_min": min(ratios), "ratio_max": max(ratios),
                                  "ratio_sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                                  "outside_quality": sum(abs(x - 1) > QUALITY for x in ratios),
                                  "outside_half_tie_quality": sum(abs(x - 1) > HALF_TIE_QUALITY for x in ratios)}
            print(f"{precision}: error ratio {min(ratios):.3f}..{max(ratios):.3f} (sd {summary[precision]['ratio_sd']:.3f}),"
                  f" {summary[precision]['outside_quality']} of {len(ratios)} outside QUALITY {QUALITY}")
    write_json(args.out, {"format": "tmpdiff.bench_half_parity/1", "model": "bundled DiT", "load_dtype": "float16",
                          "quality": QUALITY, "half_tie_quality": HALF_TIE_QUALITY, "machine": device_label("cpu"),
                          "torch_kernels": torch.backends.cpu.get_cpu_capability(), "code_version": code_version(),
                          "rows": rows, "summary": summary})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
