"""Choice rules on the calibration samples (mean, median, trimmed and geometric means, ...) judged on unseen ones.

For every exhaustive part of the given report configs (`scripts/bench_lossy.py report` configs: their tables, costs
and samples), `tmpdiff.calibration.selection_rules` halves all the part's samples at random, picks the best
in-budget schedule on a calibration set of the part's own calibration size and on the whole half by each rule, and
judges the pick's mean error on the other half against that half's optimum. Table lookups only (seconds). A part
whose config says "sample_unit": "prompts" (a pipeline's table, samples prompts x seeds) is halved by prompt, all
seeds of a prompt in one half.

    python scripts/bench_selection_rules.py results/cpu-epyc-2core/lossy-unseen120/config.json \\
        results/cpu-epyc-2core/lossy-b-unseen80/config.json \\
        results/cpu-epyc-2core/t2i_bench/exhaustive-T10/rejudged/config.json \\
        results/cpu-epyc-2core/t2i_bench/exhaustive-T8/config.json --out results/cpu-epyc-2core/selection-rules
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tmpdiff.calibration.exhaustive import load_table, merge_tables
from tmpdiff.calibration.selection_rules import render_selection_rules, selection_rules_curve
from tmpdiff.calibration.split_curve import table_samples
from tmpdiff.formats.atomic import write_bytes, write_json
from tmpdiff.formats.costs import load_costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", type=Path, nargs="+", help="report configs (config.json of a bench_lossy report)")
    parser.add_argument("--out", type=Path, required=True, help="folder for selection_rules.json and .md")
    parser.add_argument("--splits", type=int, default=20)
    args = parser.parse_args()
    results: dict = {"format": "tmpdiff.selection_rules/1", "splits": args.splits, "parts": {}}
    lines = ["# Choice rules on the calibration samples, judged on unseen ones", "",
             "Each rule picks the in-budget schedule of least statistic over the calibration samples; the pick is "
             "judged by its mean error on the unseen half against that half's own optimum (ratio 1 = the unseen "
             "optimum). *mean* is what every search here optimises (the calibration optimum). Made by "
             "`scripts/bench_selection_rules.py` from the committed tables.", ""]
    for config_path in args.configs:
        config = json.loads(config_path.read_text())
        cost = load_costs(Path(config["costs"])).step_costs()
        reference = config.get("reference", "fp32")
        for part, spec in config["exhaustive"].items():
            name = f"{config_path.parent.as_posix()} ({part})"
            table = merge_tables([load_table(p) for p in spec["tables"]])
            samples = table_samples(table, spec)
            calib_size = len(table.samples_of(spec["calib_seeds"], spec.get("calib_classes")))
            unit = 1  # a pipeline's table (samples prompts x seeds) is halved by prompt: sizes in whole prompts
            if spec.get("sample_unit") == "prompts":
                unit = int(np.unique(np.asarray(table.labels)[samples], return_counts=True)[1].max())
            sizes = sorted({calib_size, len(samples) // unit // 2 * unit})
            curve = selection_rules_curve(table, samples, cost, reference, sizes, args.splits,
                                          speedups=spec.get("speedups"), sample_unit=spec.get("sample_unit"))
            results["parts"][name] = curve
            lines += render_selection_rules(name, curve)
            print(f"{name}: done", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "selection_rules.json", results)
    write_bytes(args.out / "selection_rules.md", "\n".join(lines).encode())
    print(f"wrote {args.out / 'selection_rules.md'}")


if __name__ == "__main__":
    main()
