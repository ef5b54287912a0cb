"""DRiffusion quality and rounds: N = 2, 4, 8 workers, both modes, against the sequential sampler.

The N calls of a round run one after another in this process (the in-process executor gives the samples N workers
would), so quality is exact here; only wall time needs the workers (`scripts/bench_ray.py`). Per (mode, N), over
--samples samples (classes in turn, one noise seed): SSIM and PSNR to the sequential fp32 samples of the same noise,
the bundled classifier's accuracy on the class asked for and its log-probability (reference-free), each with a 95%
bootstrap interval, the Fréchet distance to real digits in the classifier's features (jackknife interval), the paired
difference of each against the sequential sampler, and the sequential rounds of denoiser calls per sample (measured
and the mode's formula).

  OMP_NUM_THREADS=1 python scripts/bench_parallel.py build/tiny-dit --out results/cpu-xeon-2core/parallel.json

With --pipeline DIR (a text-to-image build and its pipeline, e.g. the bundled tmpdiff/assets/tiny-t2i) the same
comparison runs through the pipeline drop-in (`run --pipeline --parallel`): --samples held-in prompts (drawn with
--seed), one pipeline call per mode and N, against sequential sampling of the same prompts and noise: SSIM and PSNR
of the RGB images, prompt adherence (the pipeline's attribute classifier) with intervals, and the Fréchet distance
to the sequential images in the classifier's features (paired jackknife), at --guidance (default: the pipeline's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tmpdiff.calibration.matched import compare, summarise
from tmpdiff.engines.device import cpu_name
from tmpdiff.engines.loading import load_engines
from tmpdiff.eval.judge import judge
from tmpdiff.eval.quality import real_low_features
from tmpdiff.formats.atomic import write_json
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.models.bundled import load_model_info
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.parallel import ParallelMode, expected_rounds, sample_parallel
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise
from tmpdiff.runtime.workers import DenoiseWorker, InProcessExecutor


def bench_pipeline(args) -> list[dict]:
    """Rows of the text-to-image comparison (see the module docstring)."""
    import random

    import numpy as np

    from tmpdiff.calibration.pipeline_session import attribute_judge
    from tmpdiff.eval.attributes import read_attributes
    from tmpdiff.eval.bootstrap import diff_ci, jackknife_ci, mean_ci
    from tmpdiff.eval.quality import frechet_distance
    from tmpdiff.eval.rgb import rgb_metrics
    from tmpdiff.models.colored_digits import attributes, held_in_combos
    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline

    prompts = [c.prompt for c in random.Random(args.seed).sample(held_in_combos(), args.samples)]
    classifier, combos = attribute_judge(args.pipeline, prompts)
    wanted = attributes(combos)

    def sample(workers: int, mode: str):
        pipe = load_pipeline(args.pipeline)
        denoiser = attach_engines(pipe, args.build_dir, precision="fp32", parallel=workers, mode=mode, threads=1,
                                  guidance_scale=args.guidance, min_alpha=args.min_alpha)
        kwargs = call_kwargs(pipe, steps=args.steps, seed=args.seed, guidance_scale=args.guidance,
                             text_len=denoiser.adapter.text_len, sample_size=denoiser.config.get("sample_size"))
        images = pipe(prompts, output_type="pt", **kwargs).images.float().cpu()
        preds, feats = read_attributes(classifier, images * 2 - 1)
        rounds = args.steps if denoiser.drafts is None else denoiser.drafts.rounds
        return images, (preds == wanted).all(dim=1).double().numpy(), feats.double().numpy(), rounds

    ref_images, ref_right, ref_feats, _ = sample(1, "conservative")
    rows = [{"mode": "sequential", "workers": 1, "rounds": args.steps, "rounds_formula": args.steps,
             "adherence": mean_ci(ref_right).as_dict()}]
    for mode in ParallelMode:
        for workers in [int(w) for w in args.workers.split(",")]:
            images, right, feats, rounds = sample(workers, mode.value)
            ssim, psnr = rgb_metrics(images, ref_images)
            fd = jackknife_ci(lambda i, feats=feats: frechet_distance(feats[i], ref_feats[i]), len(feats))
            rows.append({"mode": mode.value, "workers": workers, "rounds": rounds,
                         "rounds_formula": expected_rounds(args.steps, workers, mode),
                         "ssim": mean_ci(ssim).as_dict(), "psnr": mean_ci(np.minimum(psnr, 100.0)).as_dict(),
                         "adherence": mean_ci(right).as_dict(),
                         "adherence_vs_sequential": diff_ci(right, ref_right).as_dict(),
                         "fd_vs_sequential": fd.as_dict()})
            print(f"{mode.value} N={workers}: SSIM {rows[-1]['ssim']['value']:.4f}, adherence "
                  f"{rows[-1]['adherence']['value']:.1%}, {rounds} rounds")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_dir", type=Path, help="build directory with a built fp32 ORT engine and sampling info")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=200, help="samples, spread over the classes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", default="2,4,8")
    parser.add_argument("--pipeline", type=Path, help="text-to-image: the pipeline directory the build's denoiser runs in")
    parser.add_argument("--guidance", type=float, help="--pipeline: guidance scale (default: the pipeline's)")
    parser.add_argument("--min-alpha", type=float, default=0.0, help="--pipeline: draft only from anchors with at "
                                                                     "least this signal scale (0: the paper's)")
    args = parser.parse_args(argv)
    if args.pipeline is not None:
        rows = bench_pipeline(args)
        write_json(args.out, {"format": "tmpdiff.bench_parallel_t2i/1", "machine": cpu_name(), "steps": args.steps,
                              "samples": args.samples, "seed": args.seed, "precision": "fp32",
                              "guidance_scale": args.guidance, "min_alpha": args.min_alpha,
                              "pipeline": str(args.pipeline),
                              "executor": "pipeline drop-in, a round's calls one after another",
                              "reference": "sequential fp32 sampling in the same pipeline, same prompts and noise",
                              "rows": rows})
        print(f"wrote {args.out}")
        return 0

    manifest = load_manifest(args.build_dir)
    s = manifest.sampling
    runner = ScheduledRunner(load_engines(args.build_dir, manifest, "ort", "cpu", ["fp32"], threads=1), args.samples,
                             s.channels, s.image_size, s.guidance_scale, s.null_class, s.num_classes)
    labels = torch.arange(args.samples) % s.num_classes
    noise = initial_noise(args.samples, s.channels, s.image_size, args.seed)
    fp32 = ["fp32"] * args.steps

    reference = runner.sample(sampling_scheduler(s), labels, noise, fp32).latents.clone()
    clf = str(load_model_info().classifier_dir)
    real = real_low_features(clf)
    sequential = judge(reference, reference, labels, clf)
    rows = [{"mode": "sequential", "workers": 1, "rounds": args.steps, "rounds_formula": args.steps,
             "quality": summarise(sequential, real)}]
    for mode in ParallelMode:
        for workers in [int(w) for w in args.workers.split(",")]:
            result = sample_parallel(InProcessExecutor(DenoiseWorker(runner), workers), sampling_scheduler(s), labels,
                                     noise, fp32, mode)
            judged = judge(result.latents, reference, labels, clf)
            rows.append({"mode": mode.value, "workers": workers, "rounds": result.rounds,
                         "rounds_formula": expected_rounds(args.steps, workers, mode),
                         "quality": summarise(judged, real), "versus_sequential": compare(judged, sequential, real)})
    runner.close()
    write_json(args.out, {"format": "tmpdiff.bench_parallel/2", "machine": cpu_name(),
                          "steps": args.steps, "samples": args.samples, "seed": args.seed, "precision": "fp32",
                          "executor": "in-process (a round's calls one after another: the samples of N workers)",
                          "reference": "sequential fp32 sampler, same noise", "rows": rows})

    def cell(q, key, scale=1.0):
        d = q[key]
        return f"{d['value'] * scale:.4g} [{d['low'] * scale:.3g}, {d['high'] * scale:.3g}]"

    print(f"| mode | N | SSIM to sequential | PSNR dB | accuracy % | log p(class) | FD to real digits | rounds | "
          f"speedup in rounds | accuracy vs sequential |  ({args.samples} samples, {args.steps} steps)")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["quality"]
        ssim = q["one_minus_ssim"]
        ssim_cell = f"{1 - ssim['value']:.4f} [{1 - ssim['high']:.4f}, {1 - ssim['low']:.4f}]"
        versus = r.get("versus_sequential", {}).get("correct")
        vs = "-" if versus is None else (f"{100 * versus['diff']['value']:+.1f} [{100 * versus['diff']['low']:+.1f}, "
                                         f"{100 * versus['diff']['high']:+.1f}]")
        psnr = "-" if r["mode"] == "sequential" else cell(q, "psnr")
        print(f"| {r['mode']} | {r['workers']} | {ssim_cell} | {psnr} | {cell(q, 'correct', 100)} | "
              f"{cell(q, 'log_prob')} | {cell(q, 'fd_low')} | {r['rounds']} | {args.steps / r['rounds']:.2f}x | {vs} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
