"""Time TMPQ-DM plans end to end on the built ORT engines, beside what the per-layer costs table predicts.

The plan's layer configurations are exported from the super-network as ORT graphs (`export.mixed`, parity-checked)
into --engines-dir and run by the runtime's loop beside the build's fp32 and int8 engines, together with any
--schedule LABEL=PATH (e.g. `tmpdiff calibrate --timesteps-from plan.json`: TMPDiff's per-step precision over the
plan's timesteps). Sampling runs interleaved, the order reversed every other round. Every row is judged on the
held-out seeds against fp32 at 20 steps: accuracy, confidence, SSIM/PSNR, and FD (classifier features on the real
digits' top principal directions, scripts/bench_mteo.py's judge) as a paired difference to fp32 at 20 steps with a
bootstrap interval. Usage:

    python scripts/bench_tmpq.py BUILD_DIR --plan plan.json --layer-costs layer_costs.json --out bench.json \
        --engines-dir DIR [--schedule "TMPDiff at the plan's timesteps=schedule.json"]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from tmpdiff.engines.loading import load_engines
from tmpdiff.engines.ort import OrtEngine
from tmpdiff.eval.bootstrap import diff_ci
from tmpdiff.eval.classifier import DigitClassifier
from tmpdiff.eval.metrics import image_metrics, per_sample_metrics, to_images
from tmpdiff.export.mixed import export_mixed, optimization_level
from tmpdiff.export.supernet import supernet_from_build
from tmpdiff.formats.layer_costs import load_layer_costs
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.formats.schedule import load_schedule
from tmpdiff.formats.tmpq_plan import load_tmpq_plan
from tmpdiff.models.bundled import load_model_info
from tmpdiff.models.registry import adapter_for_config
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("build_dir", type=Path)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--layer-costs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="1000,1001,1002,1003,1004")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines-dir", type=Path, required=True)
    parser.add_argument("--schedule", action="append", default=[], metavar="LABEL=PATH",
                        help="also time and judge this schedule (its precisions, at its timesteps if it names them)")
    parser.add_argument("--bootstrap", type=int, default=500, help="paired resamples for the FD interval")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_mteo import Judge  # the FD judge of the MTEO bench: same features, same projection
    plan, table = load_tmpq_plan(args.plan), load_layer_costs(args.layer_costs)
    manifest = load_manifest(args.build_dir)
    sampling = manifest.require_sampling(args.build_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    classes = list(range(sampling.num_classes))
    labels = torch.tensor([c for _ in seeds for c in classes])
    noise = torch.cat([initial_noise(len(classes), sampling.channels, sampling.image_size, s) for s in seeds])
    engines = load_engines(args.build_dir, manifest, "ort", "cpu", ["fp32", "int8"])
    supernet = supernet_from_build(args.build_dir, load_model_info().transformer_dir, table.precisions[1:])
    adapter = adapter_for_config(manifest.denoiser_config)
    args.engines_dir.mkdir(parents=True, exist_ok=True)
    parity = {}
    for i, config in enumerate(plan.configs):
        path = args.engines_dir / f"config{i}.onnx"
        parity[f"config{i}"] = export_mixed(supernet, config, adapter, path)
        engines[f"config{i}"] = OrtEngine(path, f"config{i}", optimization=optimization_level(config), runtime=True)
    runner = ScheduledRunner(engines, len(labels), sampling.channels, sampling.image_size, sampling.guidance_scale,
                             sampling.null_class, sampling.num_classes)
    ref_steps = int(plan.reference.get("steps", 20))
    runs = {f"fp32 {ref_steps} steps": (["fp32"] * ref_steps, None),
            f"fp32 {plan.steps} steps (scheduler spacing)": (["fp32"] * plan.steps, None),
            f"fp32 at the plan's {plan.steps} timesteps": (["fp32"] * plan.steps, plan.timesteps),
            f"int8 {plan.steps} steps (scheduler spacing)": (["int8"] * plan.steps, None),
            f"int8 at the plan's {plan.steps} timesteps": (["int8"] * plan.steps, plan.timesteps)}
    runs["plan (per-layer engines)"] = ([f"config{i}" for i in plan.step_configs], plan.timesteps)
    for item in args.schedule:
        label, _, path = item.partition("=")
        schedule = load_schedule(Path(path))
        missing = sorted(set(schedule.precisions) - set(engines))
        if missing:
            engines.update(load_engines(args.build_dir, manifest, "ort", "cpu", missing))
        runs[label] = (list(schedule.precisions), schedule.timesteps)
    classifier = DigitClassifier.load(load_model_info().classifier_dir).eval()
    times: dict[str, list[float]] = {name: [] for name in runs}
    quality: dict[str, dict] = {}
    finals: dict[str, torch.Tensor] = {}
    reference_images = None
    names = list(runs)
    load = [os.getloadavg()[0]]
    for round_ in range(args.repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            precisions, timesteps = runs[name]
            started = time.perf_counter()
            latents = runner.sample(sampling_scheduler(sampling), labels, noise, precisions, timesteps=timesteps).latents
            times[name].append(time.perf_counter() - started)
            if name not in quality:  # round 0 runs the fp32 reference first
                reference_images = reference_images if quality else to_images(latents)
                with torch.no_grad():
                    logits = classifier(latents.clamp(-1, 1))
                ssim, psnr = image_metrics(to_images(latents), reference_images)
                finals[name] = latents.clone()
                quality[name] = {"accuracy": float((logits.argmax(1) == labels).float().mean()),
                                 "confidence": float(logits.softmax(1)[torch.arange(len(labels)), labels].mean()),
                                 "ssim_vs_fp32_ref": ssim, "psnr_vs_fp32_ref": psnr if ssim < 1 else None}
    load.append(os.getloadavg()[0])
    judge = Judge(argparse.Namespace(bootstrap=args.bootstrap, eval_seed=0), labels, finals[names[0]])
    ssims = {name: per_sample_metrics(to_images(finals[name]), reference_images)[0] for name in names}
    plan_row = "plan (per-layer engines)"
    for name in names:
        quality[name]["fd"] = judge(finals[name])["fd"]
        quality[name]["fd_minus_fp32_ref"] = judge.fd_difference(finals[name], finals[names[0]])
        # paired over the same noises: is a row's SSIM to the reference really above or below the plan's?
        quality[name]["ssim_minus_plan"] = diff_ci(ssims[name], ssims[plan_row], args.bootstrap).as_dict()
    reference = statistics.median(times[names[0]])
    base_ms = table.config_ms(table.uniform("fp32")) * ref_steps
    rows = {}
    for name, (precisions, _) in runs.items():
        median = statistics.median(times[name])
        predicted = sum(table.config_ms(plan.configs[int(p[6:])] if p.startswith("config") else table.uniform(p))
                        for p in precisions)
        rows[name] = {"median_s": median, "measured_speedup": reference / median, "predicted_speedup": base_ms / predicted,
                      **quality[name]}
    result = {"engine_parity": parity, "device": table.device, "samples": len(labels), "seeds": seeds, "repeats": args.repeats,
              "load_average": load, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in rows.items():
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})


if __name__ == "__main__":
    main()
