#!/usr/bin/env python
"""MTEO deployed on the engines (issue 17): step latency with and without the time-embeddings input, and the
learned rows run by `tmpdiff run`'s runner against the torch sampler they were trained with.

Builds (made in --work when missing, sampled int8 calibration as `tmpdiff export bundled` does): the bundled DiT
exported plainly and with --time-embedding-input, fp32 and int8, ORT-CPU.

  latency   per precision, one engine call at --batch rows on each build, alternating, --repeats pairs after a
            warm-up, one thread: medians and the median of the paired ratios with its 95% bootstrap interval
  quality   N = 4 on the 100 evaluation samples of scripts/bench_mteo.py (noise seed 0, labels cycling): plain,
            the timestep shift and MTEO (trajectory loss, the committed tables) through the engines at fp32, MTEO
            with every step int8, and MTEO with a mixed per-step plan; classifier accuracy, confidence, FD with a
            jackknife interval (bench_mteo.Judge), SSIM to the 20-step fp32 reference, SSIM to the torch sampler's
            samples of the same method (results/.../mteo/samples-N4.safetensors), and wall time per run (median of
            --sample-repeats); fp32 at 20 steps through the engines is timed in the same run, and every row's
            end-to-end speedup over it is reported (the issue's 4x goal)

  python scripts/bench_mteo_deploy.py --out results/cpu-epyc-2core/mteo/deploy.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tmpdiff.engines.device import cpu_name
from tmpdiff.engines.loading import load_built_engines
from tmpdiff.engines.profile import make_buffers
from tmpdiff.eval.metrics import image_metrics, to_images
from tmpdiff.formats.atomic import write_json
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.models.loading import load_safetensors
from tmpdiff.models.schedulers import schedule_scheduler
from tmpdiff.models.time_embedding_input import load_own_table
from tmpdiff.runtime.plan import resolve_plan
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise

MTEO_DIR = Path(__file__).resolve().parent.parent / "results" / "cpu-epyc-2core" / "mteo"
STEPS = 4
REFERENCE_STEPS = 20  # the end-to-end baseline: fp32 at the model's 20 steps


def make_builds(work: Path) -> dict[str, Path]:
    """The plain and the embedding-input build of the bundled DiT, fp32 and int8 (exported once)."""
    from tmpdiff.commands.export import calibration_for, resolve_model_dir
    from tmpdiff.engines.build import build_engines
    from tmpdiff.export.exporter import export_model

    model_dir = resolve_model_dir("bundled", None)
    calibration, sampling = calibration_for(model_dir, [0, 1], None, prompts=None, steps=None, guidance=None,
                                            random=False, needed=True)
    builds = {}
    for name, flag in (("plain", False), ("embedding-input", True)):
        build_dir, _ = export_model(model_dir, work / name, ["fp32", "int8"], model_id="tiny-dit",
                                    calibration=calibration, sampling=sampling, time_embedding_input=flag)
        build_engines(build_dir, "ort", "cpu")
        builds[name] = build_dir
    return builds


def bootstrap_median(values: list[float], draws: int = 2000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    medians = np.median(data[rng.integers(0, len(data), (draws, len(data)))], axis=1)
    return [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]


def latency(builds: dict[str, Path], batch: int, repeats: int) -> list[dict]:
    """Median ms of one engine call per build and precision, calls alternating between the builds."""
    from tmpdiff.engines.streams import runtime_stream

    rows, stream = [], runtime_stream("cpu")
    for precision in ("fp32", "int8"):
        engines, buffers = {}, []  # the engines read and write the buffers by pointer: keep them alive
        for name, build_dir in builds.items():
            manifest = load_manifest(build_dir)
            engine = load_built_engines(build_dir, manifest, "ort", "cpu", [precision], threads=1)[precision]
            buffers.append(make_buffers(manifest, batch, "cpu", build_dir))
            engine.bind(*buffers[-1])
            engines[name] = engine
        times: dict[str, list[float]] = {name: [] for name in engines}
        for index in range(repeats + 3):
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.run(stream)
                if index >= 3:  # warm-up
                    times[name].append(1000 * (time.perf_counter() - start))
        ratios = [e / p for e, p in zip(times["embedding-input"], times["plain"], strict=True)]
        rows.append({"precision": precision, "batch_rows": batch, "repeats": repeats,
                     "plain_ms": statistics.median(times["plain"]),
                     "embedding_input_ms": statistics.median(times["embedding-input"]),
                     "ratio_median": statistics.median(ratios), "ratio_ci95": bootstrap_median(ratios)})
        for engine in engines.values():
            engine.close()
    return rows


def plan_file(build_dir: Path, folder: Path, method: str, precisions: list[str]) -> Path:
    """A /3 plan beside a copy of the committed N = 4 table of `method`, with per-step `precisions`."""
    from tmpdiff.commands.plan_embeddings import plan_embeddings

    table = folder / f"{method}-N{STEPS}.safetensors"
    if not table.exists():
        shutil.copy(MTEO_DIR / "embeddings" / table.name, table)
    schedule = folder / f"{method}-{'-'.join(precisions)}.json"
    base = folder / f"precisions-{'-'.join(precisions)}.json"
    from tmpdiff.formats.schedule import Schedule, save_schedule

    save_schedule(Schedule(steps=STEPS, precisions=precisions), base)
    plan_embeddings(build_dir, table, schedule, schedule=base, force=True)
    return schedule


def sample(build_dir: Path, plan, labels: torch.Tensor, noise: torch.Tensor, repeats: int) -> tuple[torch.Tensor, float]:
    """The plan's samples and the median wall time of `repeats` timed runs after a warm-up."""
    manifest = load_manifest(build_dir)
    sampling = manifest.sampling
    engines = load_built_engines(build_dir, manifest, "ort", "cpu", plan.needed, threads=1)
    runner = ScheduledRunner(engines, len(labels), sampling.channels, sampling.image_size, sampling.guidance_scale,
                             sampling.null_class, sampling.num_classes,
                             own_time_embeddings=load_own_table(build_dir, manifest))
    scheduler = schedule_scheduler(plan.file, sampling) if plan.file is not None else None
    if scheduler is None:
        from tmpdiff.models.schedulers import sampling_scheduler

        scheduler = sampling_scheduler(sampling)
    try:
        runner.sample(scheduler, labels, noise, list(plan.precisions), conditioning=plan.conditioning)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = runner.sample(scheduler, labels, noise, list(plan.precisions), conditioning=plan.conditioning).latents
            times.append(time.perf_counter() - start)
        return out, statistics.median(times)
    finally:
        runner.close()


def quality(builds: dict[str, Path], work: Path, samples: int, repeats: int) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_mteo import Judge  # the same judge as the torch benchmark

    from tmpdiff.models.bundled import load_model_info, sampling_info

    s = sampling_info(load_model_info())
    labels = torch.arange(samples) % s.num_classes
    noise = initial_noise(samples, s.channels, s.image_size, 0)
    reference = load_safetensors(MTEO_DIR / "reference.safetensors")["samples"][:samples]
    torch_samples = load_safetensors(MTEO_DIR / f"samples-N{STEPS}.safetensors")
    judge = Judge(argparse.Namespace(bootstrap=0, eval_seed=0), labels, reference)  # no paired FD differences here
    folder = work / "plans"
    folder.mkdir(parents=True, exist_ok=True)
    plain, emb = builds["plain"], builds["embedding-input"]
    mixed = ["fp32", "int8", "int8", "fp32"]
    runs = [
        ("plain", "plain", plain, resolve_plan(precision="fp32", steps=STEPS)),
        ("plain int8", "plain", plain, resolve_plan(precision="int8", steps=STEPS)),
        ("shift", "shift", plain, resolve_plan(plan_file(plain, folder, "shift", ["fp32"] * STEPS))),
        ("mteo", "mteo-trajectory", emb, resolve_plan(plan_file(emb, folder, "mteo-trajectory", ["fp32"] * STEPS))),
        ("mteo int8", "mteo-trajectory", emb, resolve_plan(plan_file(emb, folder, "mteo-trajectory", ["int8"] * STEPS))),
        ("mteo " + ",".join(mixed), "mteo-trajectory", emb,
         resolve_plan(plan_file(emb, folder, "mteo-trajectory", mixed))),
        ("plain 2N", "plain-2N", plain, resolve_plan(precision="fp32", steps=2 * STEPS)),
        ("plain 20 steps (reference)", None, plain, resolve_plan(precision="fp32", steps=REFERENCE_STEPS)),
    ]
    rows = []
    for label, torch_key, build_dir, plan in runs:
        out, seconds = sample(build_dir, plan, labels, noise, repeats)
        expected = reference if torch_key is None else torch_samples[torch_key][:samples]
        ssim_torch, psnr_torch = image_metrics(to_images(out), to_images(expected))
        row = {"method": label, "build": build_dir.parent.name, "precisions": list(plan.precisions),
               "seconds": round(seconds, 3), **judge(out), "ssim_to_torch_sampler": ssim_torch,
               "psnr_to_torch_sampler": psnr_torch}
        print(f"{label:28s} acc {row['accuracy']:.3f}  FD {row['fd']:.1f} [{row['fd_ci95'][0]:.1f}, "
              f"{row['fd_ci95'][1]:.1f}]  SSIM to 20-step {row['ssim']:.4f}  SSIM to torch {ssim_torch:.4f}  "
              f"{seconds:.2f} s", flush=True)
        rows.append(row)
    reference_seconds = rows[-1]["seconds"]
    for row in rows:  # end to end against fp32 at 20 steps, both timed in this run
        row["speedup_vs_20_step_fp32"] = reference_seconds / row["seconds"]
        print(f"{row['method']:28s} {row['speedup_vs_20_step_fp32']:.2f}x faster than fp32 at {REFERENCE_STEPS} steps")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tmpdiff-mteo-deploy"))
    parser.add_argument("--batch", type=int, default=200, help="latency: rows per call (100 samples with guidance)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--sample-repeats", type=int, default=5, help="timed sampling runs per plan (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    builds = make_builds(args.work)
    report = {"format": "tmpdiff.bench_mteo_deploy/1", "machine": cpu_name(), "threads": 1, "steps": STEPS}
    report["latency"] = latency(builds, args.batch, args.repeats)
    for r in report["latency"]:
        print(f"{r['precision']}: plain {r['plain_ms']:.2f} ms, with the input {r['embedding_input_ms']:.2f} ms, "
              f"paired ratio {r['ratio_median']:.3f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]", flush=True)
    write_json(args.out, report)
    report["quality"] = quality(builds, args.work, args.samples, args.sample_repeats)
    report["fd_interval"] = "jackknife"  # quality rows' fd_ci95 (before 2026-12-07, without this key: percentile bootstrap)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
