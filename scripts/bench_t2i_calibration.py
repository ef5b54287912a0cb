#!/usr/bin/env python
"""Real-input vs random-input quantization calibration on the bundled text-to-image pipeline, per precision.

Two builds of the bundled PixArt transformer: int8, fp8 and int4 calibrated on the denoiser's inputs captured from the
stock pipeline over held-in prompts (`tmpdiff export --prompts`), and on random N(0, 1) inputs
(`--random-calibration`). Every precision then runs the whole pipeline (ORT engines attached, all steps at that
precision) on the held-in prompts and the held-out combinations, from seeds other than the capture's. Per precision
and calibration: prompt adherence (the bundled attribute classifier), SSIM over RGB and PSNR against the fp32
engine's images from the same seeds, and the FD to them in the classifier's features.

  OMP_NUM_THREADS=1 python scripts/bench_t2i_calibration.py --work /tmp/t2i-bench \
      --out results/cpu-epyc-2core/t2i_calibration.json
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path

import torch

from tmpdiff.commands.export import calibration_for, resolve_model_dir
from tmpdiff.engines.build import build_engines
from tmpdiff.engines.device import cpu_name
from tmpdiff.eval.attributes import AttributeClassifier
from tmpdiff.eval.rgb import rgb_metrics
from tmpdiff.eval.t2i import attribute_fd, generate, judge
from tmpdiff.export.exporter import export_model
from tmpdiff.formats.atomic import write_bytes, write_json
from tmpdiff.models.colored_digits import held_in_combos, held_out_combos
from tmpdiff.models.tiny_t2i import CLASSIFIER_SUBFOLDER, DEFAULT_GUIDANCE, TEXT_LEN, t2i_dir
from tmpdiff.runtime.dropin import attach_engines
from tmpdiff.runtime.pipeline_io import load_pipeline

PRECISIONS = ("int8", "fp8", "int4")



def _export(work: Path, name: str, prompts_file: Path | None, seeds: list[int], steps: int) -> Path:
    model_dir = resolve_model_dir("bundled-t2i", None)
    recipe, _ = calibration_for(model_dir, seeds, None, prompts=prompts_file, steps=steps, guidance=DEFAULT_GUIDANCE,
                                random=prompts_file is None)
    build_dir, _ = export_model(model_dir, work, ["fp32", *PRECISIONS], model_id=name, calibration=recipe,
                                graph_sizes={"text_len": TEXT_LEN}, on_progress=lambda m: print(f"[{name}] {m}", flush=True))
    build_engines(build_dir, "ort", "cpu", None, 1)
    return build_dir


def _sample(build_dir: Path, precision: str, prompts: list[str], seed: int, steps: int) -> tuple[torch.Tensor, float]:
    pipe = load_pipeline(t2i_dir())
    denoiser = attach_engines(pipe, build_dir, precision=precision, threads=1)
    started = time.perf_counter()
    try:
        images = generate(pipe, prompts, seed, steps, DEFAULT_GUIDANCE, TEXT_LEN)
    finally:
        denoiser.close()
    return images, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory for the two builds")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calib-prompts", type=int, default=32, help="held-in prompts the capture runs over")
    parser.add_argument("--calib-seeds", default="100", help="capture seeds (the evaluation uses others)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--held-in-repeats", type=int, default=2, help="samples per held-in combination")
    parser.add_argument("--held-out-repeats", type=int, default=4, help="samples per held-out combination")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)

    held_in = [c.prompt for c in held_in_combos()]
    calib_prompts = random.Random(0).sample(held_in, args.calib_prompts)
    prompts_file = args.work / "calib_prompts.txt"
    write_bytes(prompts_file, ("\n".join(calib_prompts) + "\n").encode())
    seeds = [int(s) for s in args.calib_seeds.split(",")]
    builds = {"real": _export(args.work, "real", prompts_file, seeds, args.steps),
              "random": _export(args.work, "random", None, seeds, args.steps)}

    classifier = AttributeClassifier.load(t2i_dir() / CLASSIFIER_SUBFOLDER)
    sets = {"held_in": [c for c in held_in_combos() for _ in range(args.held_in_repeats)],
            "held_out": [c for c in held_out_combos() for _ in range(args.held_out_repeats)]}
    results: dict = {}
    for set_name, combos in sets.items():
        prompts = [c.prompt for c in combos]
        reference, seconds = _sample(builds["real"], "fp32", prompts, seed=0, steps=args.steps)
        row = {"samples": len(prompts), "fp32": judge(classifier, reference, combos) | {"seconds": round(seconds, 1)}}
        print(f"{set_name} fp32: adherence {row['fp32']['adherence']:.4f} ({len(prompts)} samples)", flush=True)
        ref01 = (reference + 1) / 2
        for precision in PRECISIONS:
            for calibration, build_dir in builds.items():
                images, seconds = _sample(build_dir, precision, prompts, seed=0, steps=args.steps)
                ssim, psnr = rgb_metrics((images + 1) / 2, ref01)
                figures = judge(classifier, images, combos) | {
                    "ssim_rgb_vs_fp32": float(ssim.mean()), "ssim_rgb_vs_fp32_min": float(ssim.min()),
                    "psnr_vs_fp32": float(psnr[torch.isfinite(torch.as_tensor(psnr)).numpy()].mean()),
                    "fd_vs_fp32": attribute_fd(classifier, images, reference), "seconds": round(seconds, 1)}
                figures["adherence_loss_points"] = 100 * (row["fp32"]["adherence"] - figures["adherence"])
                row.setdefault(precision, {})[calibration] = figures
                print(f"{set_name} {precision} {calibration}: adherence {figures['adherence']:.4f} "
                      f"SSIM {figures['ssim_rgb_vs_fp32']:.4f} PSNR {figures['psnr_vs_fp32']:.2f}", flush=True)
        results[set_name] = row

    from tmpdiff.formats.manifest import load_manifest

    calibration = {name: load_manifest(b).precisions["int8"].quantization["calibration"] for name, b in builds.items()}
    for record in calibration.values():
        record.pop("scheduler", None)
    write_json(args.out, {
        "what": "bundled tiny-t2i pipeline (PixArtSigmaPipeline), every step at one precision on ORT CPU engines; "
                "quantization calibrated on captured pipeline inputs (real) vs random N(0, 1) inputs (random); "
                "SSIM over RGB, PSNR and FD (attribute classifier features) against the fp32 engine's images from the "
                "same seeds; adherence = digit, colour and background all read as asked",
        "steps": args.steps, "guidance_scale": DEFAULT_GUIDANCE, "eval_seed": 0,
        "calibration": calibration, "calibration_prompts": calib_prompts, "results": results,
        "machine": {"cpu": cpu_name(), "threads": 1, "torch": torch.__version__, "python": platform.python_version()},
        "seconds": round(time.perf_counter() - started, 1),
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
