#!/usr/bin/env python
"""MTEO deployed in the bundled text-to-image pipeline (issue 17): the stock PixArt-Sigma pipeline with its
transformer replaced by tmpdiff engines (`attach_engines`) that feed each step its learned row.

Builds (made in --work when missing): the bundled transformer exported plainly and with --time-embedding-input,
fp32 and int8 (int8 calibrated on pipeline captures of 8 held-in prompts, seed 0, 20 steps, as `tmpdiff export
bundled-t2i --prompts` does), ORT-CPU.

  latency   per precision, one engine call at --batch rows on each build, alternating, --repeats pairs after a
            warm-up, one thread: medians and the median of the paired ratios with its 95% bootstrap interval
            (adaLN-single graphs with the input project each block's row: 7 small GEMMs instead of the shared one
            and the embedder's 2)
  quality   the 30 held-out prompts x --seeds pipeline calls (seed i draws call i's noise): fp32 at 20 steps
            (the baseline), plain N = 4 and 8, MTEO N = 4, 5, 6 (trajectory loss, the committed tables of
            scripts/bench_mteo_t2i.py) at fp32 and with every step int8; prompt adherence, confidence, FD and
            SSIM to the fp32 20-step images, paired intervals against it, and the end-to-end wall time of the
            whole set (median of --sample-repeats after a warm-up) with the speedup over fp32 at 20 steps

  python scripts/bench_mteo_t2i_deploy.py --out results/cpu-epyc-2core/mteo-t2i/deploy.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_mteo_deploy import latency  # noqa: I001  (scripts/ is the script's own directory on sys.path)
from bench_mteo_t2i import Judge

from tmpdiff.engines.device import cpu_name
from tmpdiff.formats.atomic import write_json
from tmpdiff.formats.schedule import Schedule, save_schedule
from tmpdiff.models.colored_digits import held_in_combos, held_out_combos
from tmpdiff.models.tiny_t2i import TEXT_LEN, t2i_dir

RESULTS = Path(__file__).resolve().parent.parent / "results" / "cpu-epyc-2core" / "mteo-t2i"
BASELINE_STEPS = 20


def make_builds(work: Path) -> dict[str, Path]:
    """The plain and the embedding-input build of the bundled transformer, fp32 and int8 (exported once)."""
    import random

    from tmpdiff.commands.export import calibration_for, resolve_model_dir
    from tmpdiff.engines.build import build_engines
    from tmpdiff.export.exporter import export_model

    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "calibration_prompts.txt"
    if not prompts.exists():
        chosen = random.Random(1).sample([c.prompt for c in held_in_combos()], 8)
        prompts.write_text("\n".join(chosen) + "\n")
    model_dir = resolve_model_dir("bundled-t2i", None)
    builds = {}
    for name, flag in (("plain", False), ("embedding-input", True)):
        calibration, sampling = calibration_for(model_dir, [0], None, prompts=prompts, steps=BASELINE_STEPS)
        build_dir, _ = export_model(model_dir, work / name, ["fp32", "int8"], model_id="tiny-t2i",
                                    calibration=calibration, sampling=sampling, time_embedding_input=flag,
                                    graph_sizes={"text_len": TEXT_LEN})
        build_engines(build_dir, "ort", "cpu")
        builds[name] = build_dir
    return builds


def plan_for(build_dir: Path, folder: Path, steps: int, precision: str) -> Path:
    """A /3 plan feeding the committed MTEO table for `steps`, every step at `precision`."""
    from tmpdiff.commands.plan_embeddings import plan_embeddings

    folder.mkdir(parents=True, exist_ok=True)
    table = folder / f"mteo-trajectory-N{steps}.safetensors"
    if not table.exists():
        shutil.copy(RESULTS / "embeddings" / table.name, table)
    out = folder / f"mteo-N{steps}-{precision}.json"
    plan_embeddings(build_dir, table, out, precision=precision, pipeline=t2i_dir(), force=True)
    return out


def generate(build_dir: Path, plan, steps: int, seeds: int, repeats: int) -> tuple[torch.Tensor, float]:
    """Images (seed-major, [0, 1]) of the held-out prompts, and the median wall time of the whole set."""
    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline

    pipe = load_pipeline(t2i_dir())
    denoiser = attach_engines(pipe, build_dir, schedule=plan, threads=1)
    prompts = [c.prompt for c in held_out_combos()]

    def run() -> torch.Tensor:
        images = []
        for seed in range(seeds):
            kwargs = call_kwargs(pipe, steps=steps, seed=seed, guidance_scale=None, text_len=TEXT_LEN, sample_size=8)
            kwargs["timesteps"] = denoiser.timesteps  # a plan's own timesteps (None: the scheduler's spacing)
            images.append(pipe(prompts, output_type="pt", **kwargs).images.float())
        return torch.cat(images)

    try:
        run()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            images = run()
            times.append(time.perf_counter() - start)
        return images, statistics.median(times)
    finally:
        denoiser.close()


def quality(builds: dict[str, Path], work: Path, args) -> list[dict]:
    plans = work / "plans"
    runs = [("fp32 x20", builds["plain"], ["fp32"] * BASELINE_STEPS, BASELINE_STEPS),
            ("int8 x20", builds["plain"], ["int8"] * BASELINE_STEPS, BASELINE_STEPS),
            ("plain fp32 x4", builds["plain"], ["fp32"] * 4, 4),
            ("plain fp32 x8", builds["plain"], ["fp32"] * 8, 8)]
    for steps in args.mteo_steps:
        for precision in ("fp32", "int8"):
            runs.append((f"MTEO {precision} x{steps}", builds["embedding-input"],
                         plan_for(builds["embedding-input"], plans, steps, precision), steps))
    combos = [c for _ in range(args.seeds) for c in held_out_combos()]
    judge, per, rows, base_seconds = None, {}, [], None
    for name, build_dir, plan, steps in runs:
        if isinstance(plan, list):
            path = plans / f"{'-'.join(sorted(set(plan)))}-x{len(plan)}.json"
            plans.mkdir(parents=True, exist_ok=True)
            save_schedule(Schedule(steps=len(plan), precisions=plan), path)
            plan = path
        images, seconds = generate(build_dir, plan, steps, args.seeds, args.sample_repeats)
        if judge is None:
            judge = Judge(args, combos, images)  # the first run, fp32 at 20 steps, is the SSIM reference
            base_seconds = seconds
        per[name] = judge.per_sample(images)
        row = {"run": name, "steps": steps, "seconds": round(seconds, 3), "speedup_vs_fp32_x20": base_seconds / seconds,
               **judge.summary(per[name])}
        row["vs_fp32_x20"] = judge.versus(per[name], per["fp32 x20"])
        rows.append(row)
        print(f"{name:<16} {seconds:7.2f} s  {row['speedup_vs_fp32_x20']:5.2f}x  adherence {row['adherence']:.3f} "
              f"FD {row['fd']:.0f}  SSIM {row['ssim']:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tmpdiff-mteo-t2i-deploy"))
    parser.add_argument("--batch", type=int, default=60, help="latency: rows per call (30 prompts with guidance)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=10, help="quality: pipeline calls over the 30 held-out prompts")
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--mteo-steps", type=lambda v: [int(n) for n in v.split(",")], default=[4, 5, 6],
                        help="quality: MTEO step counts (committed tables of scripts/bench_mteo_t2i.py)")
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--real-per-combo", type=int, default=20)
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the bootstrap draws and rendered ground truth")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    builds = make_builds(args.work)
    report = {"format": "tmpdiff.bench_mteo_t2i_deploy/1", "machine": cpu_name(), "threads": 1}
    report["latency"] = latency(builds, args.batch, args.repeats)
    for r in report["latency"]:
        print(f"{r['precision']}: plain {r['plain_ms']:.2f} ms, with the input {r['embedding_input_ms']:.2f} ms, "
              f"paired ratio {r['ratio_median']:.3f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]", flush=True)
    write_json(args.out, report)
    report["quality"] = quality(builds, args.work, args)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
