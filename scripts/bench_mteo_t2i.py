#!/usr/bin/env python
"""MTEO on the bundled text-to-image pipeline (PixArt-style adaLN-single): distill, then judge at N = 3, 4, 6, 8.

Distillation uses the 270 held-in prompts (`distill.bundled_t2i_prompts`) and noise seeds 1000 (training) / 2000
(choosing the loss); evaluation uses the 30 held-out prompts, which no distillation saw, with noise seed --eval-seed.
Per N: plain N steps, plain 2N steps, the timestep-shift baseline, and MTEO (both losses, the better on the held-out
training noises kept, as `tmpdiff distill-embeddings` does), all through the same torch sampler (the pipeline's
loop: cond/uncond in one call, guidance 4.5, DPM-Solver++ 2M) and the pipeline's VAE. Judged by the attribute
classifier: prompt adherence (digit, digit colour and background all right) with a paired bootstrap interval of the
difference to plain 2N, confidence (mean log-probability of the asked attributes), a Fréchet distance in the
classifier's 32-d features to rendered ground truth of the same prompts (paired bootstrap interval of the difference
to plain 2N), and SSIM to the 20-step fp32 samples.

  OMP_NUM_THREADS=2 python scripts/bench_mteo_t2i.py train --out results/cpu-epyc-2core/mteo-t2i
  OMP_NUM_THREADS=2 python scripts/bench_mteo_t2i.py eval --out results/cpu-epyc-2core/mteo-t2i
  OMP_NUM_THREADS=2 python scripts/bench_mteo_t2i.py qa --steps 4 --schedule int4 --out results/cpu-epyc-2core/mteo-t2i
  python scripts/bench_mteo_t2i.py report --out results/cpu-epyc-2core/mteo-t2i
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from tmpdiff.calibration.few_step import FewStepSampler, PromptConditioning, make_scheduler
from tmpdiff.calibration.mteo import DistillConfig, embeddings_info
from tmpdiff.commands.distill import load_distiller
from tmpdiff.eval.attributes import AttributeClassifier
from tmpdiff.eval.quality import frechet_distance
from tmpdiff.eval.rgb import rgb_metrics
from tmpdiff.formats.atomic import write_json
from tmpdiff.formats.manifest import model_content_hash
from tmpdiff.models.colored_digits import attributes, held_out_combos, render_combos
from tmpdiff.models.time_embeddings import load_time_embeddings, save_time_embeddings
from tmpdiff.models.tiny_t2i import t2i_dir
from tmpdiff.runtime.pipeline_io import decode_latents
from tmpdiff.runtime.runner import initial_noise

TRAINED = {"mteo-trajectory": ("mteo", "trajectory"), "mteo-final": ("mteo", "final"),
           "shift": ("timestep-shift", "trajectory")}


def train(args, steps: int) -> None:
    distiller, denoiser_dir = load_distiller("bundled-t2i")
    base = DistillConfig(solver=args.solver, steps=steps, iterations=args.iterations, batch=args.batch,
                         train_samples=args.train_samples, reference_steps=args.reference_steps)
    start = time.perf_counter()
    data = distiller.data(base)
    data_seconds = time.perf_counter() - start
    rows = {}
    for method, (kind, loss) in TRAINED.items():
        cfg = DistillConfig(**{**base.__dict__, "kind": kind})
        result = distiller.distill(cfg, loss, data)  # type: ignore[arg-type]
        r = result.record
        print(f"N={steps} {method}: loss {r.initial:.4f} -> {r.final:.4f}, held-out MSE {r.validation_mse:.4f}, "
              f"{r.seconds:.0f} s", flush=True)
        info = embeddings_info(distiller, cfg, denoiser_dir.parent.name, result.tensor, loss,  # type: ignore[arg-type]
                               [r], model_content_hash(denoiser_dir))
        save_time_embeddings(args.out / "embeddings" / f"{method}-N{steps}.safetensors", result.tensor, info)
        rows[method] = {**r.model_dump(), "trained_parameters": info.trained_parameters,
                        "parameter_fraction": info.parameter_fraction}
    write_json(args.out / f"train-N{steps}.json", {
        "steps": steps, "solver": args.solver, "timesteps": distiller.timesteps(args.solver, steps),
        "data_and_reference_seconds": round(data_seconds, 1), "train_samples": args.train_samples,
        "iterations": args.iterations, "batch": args.batch, "reference_steps": args.reference_steps,
        "threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 2), "methods": rows})


class Judge:
    """Adherence, confidence, FD to rendered ground truth and SSIM to the 20-step samples, with paired intervals."""

    def __init__(self, args, combos, reference_images: torch.Tensor) -> None:
        self.classifier = AttributeClassifier.load(t2i_dir() / "classifier")
        self.asked = attributes(combos)
        real, _ = render_combos(held_out_combos(), args.real_per_combo, seed=args.eval_seed + 1)
        self.real = self.features(real)
        self.reference = reference_images
        self.draws = np.random.default_rng(args.eval_seed).integers(0, len(combos), (args.bootstrap, len(combos)))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.features(images).double().numpy()

    @torch.no_grad()
    def per_sample(self, images01: torch.Tensor) -> dict[str, np.ndarray]:
        images = images01 * 2.0 - 1.0
        feats = self.classifier.features(images)
        logits = self.classifier.heads(feats)
        right = torch.stack([lg.argmax(1) for lg in logits], 1) == self.asked
        logp = torch.stack([lg.log_softmax(1).gather(1, self.asked[:, i : i + 1])[:, 0] for i, lg in enumerate(logits)], 1)
        return {"adherent": right.all(1).numpy().astype(float), "confidence": logp.mean(1).numpy(),
                "features": feats.double().numpy(), "ssim": rgb_metrics(images01, self.reference)[0]}

    def summary(self, s: dict[str, np.ndarray]) -> dict:
        return {"adherence": float(s["adherent"].mean()), "confidence": float(s["confidence"].mean()),
                "fd": frechet_distance(s["features"], self.real), "ssim": float(s["ssim"].mean())}

    def versus(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
        """a - b per metric, with a paired bootstrap 95% interval (the same prompts and noises resampled for both)."""
        out = {}
        for key in ("adherent", "confidence", "ssim"):
            d = a[key] - b[key]
            boot = [d[i].mean() for i in self.draws]
            out[key] = [float(d.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
        fd = [frechet_distance(a["features"][i], self.real) - frechet_distance(b["features"][i], self.real)
              for i in self.draws]
        out["fd"] = [frechet_distance(a["features"], self.real) - frechet_distance(b["features"], self.real),
                     float(np.percentile(fd, 2.5)), float(np.percentile(fd, 97.5))]
        return out


def _sample(distiller, steps: int, index, noise, pipe, models=None, solver: str = "dpmsolver++",
            **conditioning) -> tuple[torch.Tensor, float]:
    sampler = FewStepSampler(distiller.model if models is None else models, steps, distiller.guidance_scale,
                             distiller.conditioning, distiller.channels)
    start = time.perf_counter()
    with torch.no_grad():
        latents = sampler.sample_states(make_scheduler(solver, distiller.scheduler_config), index, noise,
                                        **conditioning)[-1]
        seconds = time.perf_counter() - start
        return decode_latents(pipe, latents), seconds


def evaluate(args, steps_list: list[int]) -> None:
    from tmpdiff.runtime.pipeline_io import load_pipeline

    combos = [c for c in held_out_combos() for _ in range(args.per_combo)]
    distiller, _ = load_distiller("bundled-t2i", prompts=[c.prompt for c in held_out_combos()])
    distiller.conditioning = _expanded(distiller.conditioning, args.per_combo)
    pipe = load_pipeline(t2i_dir())  # its VAE decodes
    index = torch.arange(len(combos))
    noise = initial_noise(len(combos), distiller.channels, distiller.image_size, args.eval_seed)
    reference, ref_seconds = _sample(distiller, 20, index, noise, pipe)
    judge = Judge(args, combos, reference)
    ref_row = {"method": "plain-20", "model_calls": 20, "seconds": round(ref_seconds, 2),
               **judge.summary(judge.per_sample(reference))}
    print(json.dumps(ref_row), flush=True)
    for steps in steps_list:
        runs = [("plain", steps, {}), ("plain-2N", 2 * steps, {})]
        for method, (kind, _) in TRAINED.items():
            tensor, _info = load_time_embeddings(args.out / "embeddings" / f"{method}-N{steps}.safetensors")
            runs.append((method, steps, {"embeddings" if kind == "mteo" else "shifts": tensor}))
        per, rows = {}, []
        for method, n, conditioning in runs:
            images, seconds = _sample(distiller, n, index, noise, pipe, solver=args.solver, **conditioning)
            per[method] = judge.per_sample(images)
            rows.append({"method": method, "N": steps, "model_calls": n, "seconds": round(seconds, 2),
                         **judge.summary(per[method])})
            print(json.dumps(rows[-1]), flush=True)
        for row in rows:
            row["vs_plain_2N"] = judge.versus(per[row["method"]], per["plain-2N"])
        write_json(args.out / f"eval-N{steps}.json", {
            "steps": steps, "samples": len(combos), "prompts": "the 30 held-out combinations", "per_combo": args.per_combo,
            "eval_seed": args.eval_seed, "bootstrap": args.bootstrap, "real_per_combo": args.real_per_combo,
            "reference_20_steps": ref_row, "rows": rows, "threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2)})


def quantization_aware(args, steps: int) -> None:
    """QA-MTEO at N = `steps` with every step at --schedule: distilled through the fake-quant models (calibrated on
    pipeline captures of 8 held-in prompts, seed 0, 20 steps, as the export does), judged beside MTEO trained in fp32
    and run quantized, on the held-out prompts."""
    import random

    from tmpdiff.calibration.mteo import Distiller
    from tmpdiff.calibration.mteo_quant import differentiable_attention, fake_quant_models, step_models
    from tmpdiff.models.colored_digits import held_in_combos
    from tmpdiff.models.registry import adapter_for_config
    from tmpdiff.models.tiny_t2i import TEXT_LEN
    from tmpdiff.runtime.capture import PipelineCapture, prompted_calibration
    from tmpdiff.runtime.pipeline_io import load_pipeline

    schedule = [args.schedule] * steps
    distiller, _ = load_distiller("bundled-t2i")
    adapter = adapter_for_config({**dict(distiller.model.config), "text_len": TEXT_LEN})
    prompts = random.Random(1).sample([c.prompt for c in held_in_combos()], 8)
    start = time.perf_counter()
    calibration = prompted_calibration(distiller.model, adapter, PipelineCapture(t2i_dir(), prompts, [0], 20, None))
    models = fake_quant_models(distiller.model, None, schedule, calibration=(adapter, calibration))
    quant_seconds = time.perf_counter() - start
    per_step = step_models(schedule, models)
    qa = Distiller(distiller.model, distiller.scheduler_config, distiller.guidance_scale, distiller.conditioning,
                   distiller.channels, distiller.image_size, step_models=per_step)
    cfg = DistillConfig(solver=args.solver, steps=steps, iterations=args.iterations, batch=args.batch,
                        train_samples=args.train_samples, reference_steps=args.reference_steps)
    data = qa.data(cfg)  # the fp32 reference: data() samples with the fp32 model
    with differentiable_attention():
        result = qa.distill(cfg, "trajectory", data)
    r = result.record
    print(f"N={steps} QA-MTEO {args.schedule}: loss {r.initial:.4f} -> {r.final:.4f}, held-out {r.validation_mse:.4f}, "
          f"{r.seconds:.0f} s", flush=True)
    fp32_tensor, _ = load_time_embeddings(args.out / "embeddings" / f"mteo-trajectory-N{steps}.safetensors")
    combos = [c for c in held_out_combos() for _ in range(args.per_combo)]
    evaluation, _ = load_distiller("bundled-t2i", prompts=[c.prompt for c in held_out_combos()])
    evaluation.conditioning = _expanded(evaluation.conditioning, args.per_combo)
    pipe = load_pipeline(t2i_dir())
    index = torch.arange(len(combos))
    noise = initial_noise(len(combos), evaluation.channels, evaluation.image_size, args.eval_seed)
    reference, _ = _sample(evaluation, 20, index, noise, pipe)
    judge = Judge(args, combos, reference)
    quantized = per_step  # the training's fake-quant models: same weights, same calibration (not quantized twice)
    per, rows = {}, []
    for method, used, conditioning in [
            ("MTEO fp32", None, {"embeddings": fp32_tensor}), (f"plain {args.schedule}", quantized, {}),
            (f"MTEO fp32-trained, run {args.schedule}", quantized, {"embeddings": fp32_tensor}),
            (f"QA-MTEO {args.schedule}", quantized, {"embeddings": result.tensor})]:
        images, seconds = _sample(evaluation, steps, index, noise, pipe, used, solver=args.solver, **conditioning)
        per[method] = judge.per_sample(images)
        rows.append({"method": method, "N": steps, "seconds": round(seconds, 2), **judge.summary(per[method])})
        print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row["vs_mteo_fp32"] = judge.versus(per[row["method"]], per["MTEO fp32"])
    write_json(args.out / f"qa-{args.schedule}-N{steps}.json", {
        "steps": steps, "schedule": schedule, "loss": "trajectory", "quantize_seconds": round(quant_seconds, 1),
        "calibration_prompts": prompts, "training": r.model_dump(), "samples": len(combos), "rows": rows,
        "threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 2)})


def _expanded(conditioning: PromptConditioning, repeats: int) -> PromptConditioning:
    """Each prompt `repeats` times in a row (sample i asks prompt i // repeats)."""
    return PromptConditioning(conditioning.embeds.repeat_interleave(repeats, 0),
                              conditioning.mask.repeat_interleave(repeats, 0), conditioning.negative_embeds,
                              conditioning.negative_mask)


def report(args) -> None:
    """OUT/mteo_t2i.md from the train and eval files: one table per N and the training record."""
    import json

    lines = ["# MTEO on the bundled text-to-image pipeline", "",
             "Held-out prompts (30 combinations no distillation saw) x 10 noises; intervals: paired bootstrap 95% of the "
             "difference to plain sampling at 2N steps. Adherence = digit, digit colour and background all right.", ""]
    for path in sorted(args.out.glob("eval-N*.json"), key=lambda p: int(p.stem.split("N")[1])):
        data = json.loads(path.read_text())
        ref = data["reference_20_steps"]
        lines += [f"## N = {data['steps']}", "",
                  f"fp32 20 steps: adherence {ref['adherence']:.1%}, FD {ref['fd']:.1f}", "",
                  "| method | model calls | adherence | Δ vs plain 2N [95%] | confidence | FD | FD Δ vs plain 2N [95%] | "
                  "SSIM to 20 steps | s |", "|---|---|---|---|---|---|---|---|---|"]
        for row in data["rows"]:
            d = row["vs_plain_2N"]
            lines.append(f"| {row['method']} | {row['model_calls']} | {row['adherence']:.1%} | "
                         f"{100 * d['adherent'][0]:+.1f} [{100 * d['adherent'][1]:+.1f}, {100 * d['adherent'][2]:+.1f}] | "
                         f"{row['confidence']:.3f} | {row['fd']:.1f} | {d['fd'][0]:+.1f} [{d['fd'][1]:+.1f}, {d['fd'][2]:+.1f}] | "
                         f"{row['ssim']:.3f} | {row['seconds']:.1f} |")
        train = json.loads((args.out / f"train-N{data['steps']}.json").read_text())
        lines += ["", "| trained | loss before -> after | held-out sample MSE | parameters | s |", "|---|---|---|---|---|"]
        for name, r in train["methods"].items():
            lines.append(f"| {name} | {r['initial']:.4f} -> {r['final']:.4f} | {r['validation_mse']:.4f} | "
                         f"{r['trained_parameters']:,} ({r['parameter_fraction']:.3%}) | {r['seconds']:.0f} |")
        lines.append("")
    (args.out / "mteo_t2i.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'mteo_t2i.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["train", "eval", "qa", "report"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", default="3,4,6,8")
    parser.add_argument("--solver", default="dpmsolver++", choices=["dpmsolver++", "ddim"],
                        help="the few-step solver (the 20-step reference is DPM-Solver++ either way)")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=32)
    parser.add_argument("--reference-steps", type=int, default=50)
    parser.add_argument("--per-combo", type=int, default=10, help="eval: noises per held-out prompt")
    parser.add_argument("--real-per-combo", type=int, default=20, help="eval: rendered ground truth per prompt (FD)")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--schedule", default="int8", help="qa: the precision of every step (int8, fp8, int4)")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase == "train":
        for n in steps:
            train(args, n)
    elif args.phase == "eval":
        evaluate(args, steps)
    elif args.phase == "qa":
        for n in steps:
            quantization_aware(args, n)
    else:
        report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
