#!/usr/bin/env python
"""TMPQ-DM in the bundled text-to-image pipeline (issue 16, item 5 on the t2i model): the joint search run inside the
stock PixArt-Sigma pipeline, its plan deployed, and every row timed end to end through the diffusers drop-in.

Phases (each writes into --work, the report is rewritten after each):
  build     the bundled transformer exported at fp32 + int8 (int8 calibrated on pipeline captures of 8 held-in prompts,
            seed 0, 20 steps: `tmpdiff export bundled-t2i --prompts`), ORT-CPU engines, and the per-layer costs table
            (`tmpdiff layer-costs`, batch --costs-batch: 20 = 10 prompts with guidance by default, one thread)
  search    `tmpdiff search-plan --model bundled-t2i`: candidates sampled in the pipeline on --search-prompts held-in
            prompts x seed 100, fitness --metric, budget --speedup (predicted from the table); judged by the command on
            the 30 held-out prompts x seeds 1000-1004
  deploy    `tmpdiff deploy-plan` (mixed layer configurations as ORT graphs)
  combo     the combination: `tmpdiff profile` (whole engine calls at batch 60 = 30 prompts with guidance, one thread)
            and `tmpdiff calibrate --pipeline --timesteps-from plan.json` on the search prompts x seed 100, at the
            speedup over fp32 at the plan's timesteps that the joint plan measured in the previous quality run
            (--combo-speedup; TMPDiff's per-step precision over TMPQ-DM's timesteps, same cost)
  quality   the 30 held-out prompts x --seeds pipeline calls (seed i draws call i's noise), every row through the
            engines in the stock pipeline (`attach_engines`, one thread): fp32 and int8 at 20 steps, fp32 and int8 at
            the plan's step count with the scheduler's spacing, fp32 and int8 at the plan's timesteps, the joint plan, the combination.
            Prompt adherence, confidence, FD to rendered ground truth and SSIM to the fp32 20-step images, paired
            intervals against fp32 at 20 steps and against the joint plan; end-to-end wall time of the whole set
            (median of --sample-repeats after a warm-up; text encoder and VAE included), speedup over fp32 at 20

  python scripts/bench_tmpq_t2i.py --out results/cpu-epyc-2core/tmpq-t2i/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import torch
from bench_mteo_t2i import Judge  # noqa: I001  (scripts/ is the script's own directory on sys.path)
from bench_mteo_t2i_deploy import generate

from tmpdiff.engines.device import cpu_name
from tmpdiff.formats.atomic import write_json
from tmpdiff.formats.schedule import Schedule, save_schedule
from tmpdiff.formats.tmpq_plan import load_tmpq_plan
from tmpdiff.models.colored_digits import held_in_combos, held_out_combos
from tmpdiff.models.tiny_t2i import t2i_dir

BASELINE_STEPS = 20


def tmpdiff_cli(*args) -> None:
    """One tmpdiff command as a user runs it (its own process, one thread); a failure stops the bench."""
    import subprocess

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "tmpdiff.cli", *map(str, args)], env=env, capture_output=True,
                            text=True)
    print(result.stdout[-4000:], flush=True)
    if result.returncode != 0:
        raise SystemExit(f"tmpdiff {' '.join(map(str, args[:2]))} failed ({result.returncode}): {result.stderr[-2000:]}")


def build(work: Path, args) -> Path:
    build_dir = work / "tiny-t2i"
    if (build_dir / "manifest.json").exists() and (work / "layer_costs.json").exists():
        return build_dir
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "calibration_prompts.txt"
    prompts.write_text("\n".join(random.Random(1).sample([c.prompt for c in held_in_combos()], 8)) + "\n")
    tmpdiff_cli("export", "bundled-t2i", "--precisions", "fp32,int8", "--prompts", prompts, "--out", work)
    tmpdiff_cli("build", build_dir, "--threads", 1)
    tmpdiff_cli("layer-costs", build_dir, "--model", "bundled-t2i", "--out", work / "layer_costs.json", "--batch",
                args.costs_batch,
                "--threads", 1, "--force")
    return build_dir


def search(build_dir: Path, work: Path, args) -> Path:
    plan = work / "plan.json"
    if plan.exists():
        return plan
    held_in = [c.prompt for c in held_in_combos()]
    prompts = work / "search_prompts.txt"
    prompts.write_text("\n".join(random.Random(2).sample(held_in, args.search_prompts)) + "\n")
    held_out = work / "held_out_prompts.txt"
    held_out.write_text("\n".join(c.prompt for c in held_out_combos()) + "\n")
    tmpdiff_cli("search-plan", build_dir, "--model", "bundled-t2i", "--layer-costs", work / "layer_costs.json",
                "--steps", args.steps, "--speedup", args.speedup, "--metric", args.metric, "--prompts", prompts,
                "--holdout-prompts", held_out, "--generations", args.generations, "--out", plan)
    return plan


def quality(build_dir: Path, plan_path: Path, work: Path, args) -> list[dict]:
    plan = load_tmpq_plan(plan_path)
    steps, timesteps = plan.steps, list(plan.timesteps)
    plans = work / "plans"
    plans.mkdir(parents=True, exist_ok=True)

    def schedule(name: str, precisions: list[str], at: list[int] | None = None) -> Path:
        path = plans / f"{name}.json"
        save_schedule(Schedule(steps=len(precisions), precisions=precisions, timesteps=at), path)
        return path

    runs = [("fp32 x20", schedule("fp32-x20", ["fp32"] * BASELINE_STEPS), BASELINE_STEPS),
            ("int8 x20", schedule("int8-x20", ["int8"] * BASELINE_STEPS), BASELINE_STEPS),
            (f"fp32 x{steps} (scheduler spacing)", schedule(f"fp32-x{steps}", ["fp32"] * steps), steps),
            (f"int8 x{steps} (scheduler spacing)", schedule(f"int8-x{steps}", ["int8"] * steps), steps),
            (f"fp32 at the plan's {steps} timesteps", schedule("fp32-at-plan", ["fp32"] * steps, timesteps), steps),
            (f"int8 at the plan's {steps} timesteps", schedule("int8-at-plan", ["int8"] * steps, timesteps), steps),
            ("joint plan (timesteps + per-layer precision)", plan_path, steps)]
    if args.combo is not None:
        runs.append(("TMPDiff per-step precision at the plan's timesteps", args.combo, steps))
    combos = [c for _ in range(args.seeds) for c in held_out_combos()]
    judge, per, rows, base_seconds = None, {}, [], None
    for name, path, n in runs:
        images, seconds = generate(build_dir, path, n, args.seeds, args.sample_repeats)
        if judge is None:
            judge = Judge(args, combos, images)  # the first run, fp32 at 20 steps, is the SSIM reference
            base_seconds = seconds
        per[name] = judge.per_sample(images)
        row = {"run": name, "steps": n, "seconds": round(seconds, 3), "speedup_vs_fp32_x20": base_seconds / seconds,
               **judge.summary(per[name]), "vs_fp32_x20": judge.versus(per[name], per["fp32 x20"])}
        rows.append(row)
        print(f"{name:<46} {seconds:7.2f} s  {row['speedup_vs_fp32_x20']:5.2f}x  adherence {row['adherence']:.3f} "
              f"FD {row['fd']:.0f}  SSIM {row['ssim']:.3f}", flush=True)
    joint = "joint plan (timesteps + per-layer precision)"
    for row in rows:
        row["vs_joint_plan"] = judge.versus(per[row["run"]], per[joint])
    return rows


def combo(build_dir: Path, plan_path: Path, work: Path, args) -> Path:
    """TMPDiff calibrated in the pipeline over the plan's timesteps with this machine's measured step costs."""
    out = work / "combo_schedule.json"
    if out.exists():
        return out
    tmpdiff_cli("profile", build_dir, "--out", work / "costs_measured.json", "--batch", 60, "--threads", 1, "--force")
    tmpdiff_cli("calibrate", build_dir, "--costs", work / "costs_measured.json", "--pipeline", t2i_dir(),
                "--prompts", work / "search_prompts.txt", "--calib-seeds", 100, "--timesteps-from", plan_path,
                "--speedup", args.combo_speedup, "--threads", 1, "--out", out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tmpdiff-tmpq-t2i"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--costs-batch", type=int, default=20,
                        help="rows per call of the per-layer costs table (the quality runs call with 60)")
    parser.add_argument("--speedup", type=float, default=2.9, help="search budget: predicted speedup over fp32 x20")
    parser.add_argument("--metric", default="ssim")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--search-prompts", type=int, default=20, help="held-in prompts the search evaluates on")
    parser.add_argument("--seeds", type=int, default=10, help="quality: pipeline calls over the 30 held-out prompts")
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--combo-speedup", type=float, default=None,
                        help="also calibrate and judge the combination at this speedup over fp32 at the plan's "
                             "timesteps (the joint plan's measured ratio)")
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--real-per-combo", type=int, default=20)
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the bootstrap draws and rendered ground truth")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = {"format": "tmpdiff.bench_tmpq_t2i/1", "machine": cpu_name(), "threads": 1,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "load_average": list(os.getloadavg())}
    build_dir = build(args.work, args)
    report["layer_costs"] = json.loads((args.work / "layer_costs.json").read_text())
    plan_path = search(build_dir, args.work, args)
    report["plan"] = json.loads(plan_path.read_text())
    write_json(args.out, report)
    tmpdiff_cli("deploy-plan", build_dir, plan_path, "--model", "bundled-t2i")
    args.combo = None if args.combo_speedup is None else combo(build_dir, plan_path, args.work, args)
    if args.combo is not None:
        report["combo_schedule"] = json.loads(args.combo.read_text())
    report["quality"] = quality(build_dir, plan_path, args.work, args)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
