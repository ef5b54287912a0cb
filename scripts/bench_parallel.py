#!/usr/bin/env python
"""DRiffusion quality and rounds: N = 2, 4, 8 workers, both modes, against the sequential sampler.

The N calls of a round run one after another in this process (the in-process executor gives the samples N workers
would), so quality is exact here; only wall time would need the workers. Per (mode, N): SSIM and PSNR to the
sequential fp32 samples (tmpdiff/eval/metrics.py), the bundled classifier's accuracy on the class asked for, and the
sequential rounds of denoiser calls per sample (measured and the mode's formula).

  OMP_NUM_THREADS=1 python scripts/bench_parallel.py build/tiny-dit --out results/cpu-epyc-2core/parallel.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from tmpdiff.engines.device import cpu_name
from tmpdiff.engines.loading import load_engines
from tmpdiff.eval.classifier import DigitClassifier, classify
from tmpdiff.eval.metrics import image_metrics, to_images
from tmpdiff.formats.atomic import write_json
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.models.bundled import load_model_info
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.parallel import ParallelMode, expected_rounds, sample_parallel
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise
from tmpdiff.runtime.workers import DenoiseWorker, InProcessExecutor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_dir", type=Path, help="build directory with a built fp32 ORT engine and sampling info")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=20, help="samples, spread over the classes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", default="2,4,8")
    args = parser.parse_args(argv)

    manifest = load_manifest(args.build_dir)
    s = manifest.sampling
    runner = ScheduledRunner(load_engines(args.build_dir, manifest, "ort", "cpu", ["fp32"], threads=1), args.samples,
                             s.channels, s.image_size, s.guidance_scale, s.null_class, s.num_classes)
    labels = torch.arange(args.samples) % s.num_classes
    noise = initial_noise(args.samples, s.channels, s.image_size, args.seed)
    fp32 = ["fp32"] * args.steps
    classifier = DigitClassifier.load(load_model_info().classifier_dir)

    reference = runner.sample(sampling_scheduler(s), labels, noise, fp32).latents
    ref_images = to_images(reference)
    rows = [{"mode": "sequential", "workers": 1, "ssim": 1.0, "psnr": None, "rounds": args.steps,
             "rounds_formula": args.steps, "accuracy": float((classify(classifier, reference)[0] == labels).float().mean())}]
    for mode in ParallelMode:
        for workers in [int(w) for w in args.workers.split(",")]:
            result = sample_parallel(InProcessExecutor(DenoiseWorker(runner), workers), sampling_scheduler(s), labels,
                                     noise, fp32, mode)
            ssim, psnr = image_metrics(to_images(result.latents), ref_images)
            psnr = round(psnr, 2) if math.isfinite(psnr) else None
            rows.append({"mode": mode.value, "workers": workers, "ssim": round(ssim, 4), "psnr": psnr,
                         "rounds": result.rounds, "rounds_formula": expected_rounds(args.steps, workers, mode),
                         "accuracy": float((classify(classifier, result.latents)[0] == labels).float().mean())})
    runner.close()
    write_json(args.out, {"format": "tmpdiff.bench_parallel/1", "machine": cpu_name(),
                          "steps": args.steps, "samples": args.samples, "seed": args.seed, "precision": "fp32",
                          "executor": "in-process (a round's calls one after another: the samples of N workers)",
                          "reference": "sequential fp32 sampler, same noise", "rows": rows})
    print(f"| mode | N | SSIM | PSNR dB | accuracy | rounds/sample | speedup in rounds |  ({args.samples} samples, "
          f"{args.steps} steps)")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        psnr = "-" if r["psnr"] is None else f"{r['psnr']:.2f}"
        print(f"| {r['mode']} | {r['workers']} | {r['ssim']:.4f} | {psnr} | {r['accuracy']:.0%} | {r['rounds']} | "
              f"{args.steps / r['rounds']:.2f}x |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
