#!/usr/bin/env python
"""Engine-switch overhead: the same steps run as a uniform schedule and as one that changes engine every step.

Two engines of the same graph (two sessions of one precision) isolate the cost of switching from
the cost difference between precisions. Also runs an fp32/int8 alternation, and optionally a calibrated
schedule, to compare the measured step latency against what the costs table predicts. Per run the mean
ms per step; medians over repeats, schedules interleaved, all in one process.

  python scripts/bench_switch.py build/tiny-dit --out bench-switch.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from tmpdiff.engines.loading import load_engines
from tmpdiff.engines.ort_build import load_ort_engine
from tmpdiff.engines.ort_process import own_process
from tmpdiff.formats.atomic import write_json
from tmpdiff.formats.manifest import engine_key, load_manifest
from tmpdiff.formats.schedule import load_schedule
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise


def run_schedule(runner: ScheduledRunner, sampling, schedule: list[str], samples: int) -> float:
    """Mean milliseconds per step of one sampling run."""
    labels = torch.arange(samples) % sampling.num_classes
    result = runner.sample(sampling_scheduler(sampling), labels, initial_noise(samples, sampling.channels,
                                                                           sampling.image_size, 0), schedule)
    return statistics.fmean(e.seconds for e in result.trace.steps) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build_dir", type=Path)
    parser.add_argument("--precision", default="fp32", help="precision of the two identical engines")
    parser.add_argument("--cheap", default="int8", help="second precision of the mixed alternation")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10, help="samples per run (engine batch = 2x with guidance)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--threading", choices=("per-session", "shared"), default="shared",
                        help="one ORT thread pool shared by all sessions (the tmpdiff CLI's way), or a pool per session")
    parser.add_argument("--costs", type=Path, default=None, help="costs table for the predicted mixed latency")
    parser.add_argument("--schedule", type=Path, default=None,
                        help="a calibrated schedule.json (steps = --steps) to time against the costs table's prediction")
    parser.add_argument("--out", type=Path, default=Path("bench-switch.json"))
    args = parser.parse_args(argv)

    if args.threading == "shared":
        own_process()  # as the tmpdiff CLI does
    else:
        os.environ["TMPDIFF_ORT_PER_SESSION_THREADS"] = "1"
    manifest = load_manifest(args.build_dir)
    sampling = manifest.sampling
    calibrated = load_schedule(args.schedule).precisions if args.schedule else []
    names = list(dict.fromkeys([args.precision, args.cheap, *calibrated]))
    engines = load_engines(args.build_dir, manifest, "ort", "cpu", names, args.threads)
    twin = load_ort_engine(args.build_dir, manifest, manifest.engines[engine_key("ort", "cpu", args.precision)], "cpu", args.threads)
    engines["twin"] = twin
    runner = ScheduledRunner(engines, args.samples, sampling.channels, sampling.image_size, sampling.guidance_scale,
                             sampling.null_class, sampling.num_classes)
    schedules = {
        "uniform": [args.precision] * args.steps,
        "alternating_same_graph": [args.precision if i % 2 == 0 else "twin" for i in range(args.steps)],
        f"uniform_{args.cheap}": [args.cheap] * args.steps,
        f"alternating_{args.precision}_{args.cheap}": [args.precision if i % 2 == 0 else args.cheap
                                                       for i in range(args.steps)],
    }
    if calibrated:
        schedules["calibrated"] = calibrated
    run_schedule(runner, sampling, schedules["uniform"], args.samples)  # warm-up every engine once
    run_schedule(runner, sampling, schedules[f"uniform_{args.cheap}"], args.samples)
    per_step: dict[str, list[float]] = {name: [] for name in schedules}
    for _ in range(args.repeats):
        for name, schedule in schedules.items():  # interleaved, so drift hits every schedule alike
            per_step[name].append(run_schedule(runner, sampling, schedule, args.samples))
    medians = {name: statistics.median(v) for name, v in per_step.items()}
    overhead = medians["alternating_same_graph"] / medians["uniform"] - 1.0
    mixed = f"alternating_{args.precision}_{args.cheap}"
    predicted = (medians["uniform"] + medians[f"uniform_{args.cheap}"]) / 2
    report = {
        "device": manifest.engines[engine_key("ort", "cpu", args.precision)].device,
        "threading": args.threading, "spinning": os.environ.get("TMPDIFF_ORT_SPINNING", "0") == "1" or args.threading == "shared",
        "steps": args.steps, "samples": args.samples, "repeats": args.repeats,
        "step_ms": medians, "step_ms_is": "mean over a run's steps, median over repeats",
        "switch_overhead_fraction": overhead,
        "mixed_vs_uniform_mean": {"measured_ms": medians[mixed], "predicted_ms": predicted,
                                  "ratio": medians[mixed] / predicted},
    }
    if args.costs:
        costs = json.loads(args.costs.read_text())["precisions"]
        from_table = (costs[args.precision]["median_ms"] + costs[args.cheap]["median_ms"]) / 2
        report["mixed_vs_costs_table"] = {"measured_ms": medians[mixed], "predicted_ms": from_table,
                                          "ratio": medians[mixed] / from_table}
        if calibrated:
            predicted_run = statistics.fmean(costs[p]["median_ms"] for p in calibrated)
            switches = sum(a != b for a, b in zip(calibrated, calibrated[1:], strict=False))
            report["calibrated_vs_costs_table"] = {"schedule": calibrated, "switches": switches,
                                                   "measured_ms": medians["calibrated"], "predicted_ms": predicted_run,
                                                   "ratio": medians["calibrated"] / predicted_run}
    write_json(args.out, report)
    print(f"{'schedule':<34}{'ms/step':>16}")
    for name, value in medians.items():
        print(f"{name:<34}{value:>16.2f}")
    print(f"switch overhead (same graph, every step): {overhead * 100:+.2f}% per step")
    print(f"{mixed}: measured {medians[mixed]:.2f} ms/step vs {predicted:.2f} predicted from the uniform runs")
    if args.costs:
        table = report["mixed_vs_costs_table"]
        print(f"{mixed}: measured {table['measured_ms']:.2f} ms/step vs {table['predicted_ms']:.2f} from the costs table "
              f"({(table['ratio'] - 1) * 100:+.1f}%)")
        if calibrated:
            table = report["calibrated_vs_costs_table"]
            print(f"calibrated ({table['switches']} switches): measured {table['measured_ms']:.2f} ms/step vs "
                  f"{table['predicted_ms']:.2f} from the costs table ({(table['ratio'] - 1) * 100:+.1f}%)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
