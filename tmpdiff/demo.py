"""`tmpdiff demo`: the bundled model end to end on CPU (export fp32 -> ONNX Runtime -> sample a grid)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tmpdiff.atomic import write_json
from tmpdiff.engines.ort import OrtDenoiser, OrtEngine
from tmpdiff.eval.classifier import DigitClassifier, classify
from tmpdiff.eval.images import grid_image, save_png
from tmpdiff.export.pipeline import export_model
from tmpdiff.models.bundled import load_model_info
from tmpdiff.models.digits import to_uint8
from tmpdiff.runtime.sampler import initial_noise, load_scheduler, sample


def run_demo(out: Path, per_class: int = 8, steps: int | None = None, seed: int = 0, threads: int | None = None,
             console: Console | None = None) -> dict:
    """Export the bundled model, sample `per_class` images of every class with ORT, write grid and report."""
    console = console or Console(stderr=True)
    info = load_model_info()
    steps = steps or info.default_steps
    started = time.perf_counter()

    build_dir, outcomes = export_model(info.transformer_dir, out / "build", ["fp32"], model_id="tiny-dit",
                                       on_progress=lambda msg: console.print(f"export {msg}"))
    engine = OrtEngine(outcomes[0].onnx_path, threads=threads)
    classifier = DigitClassifier.load(info.classifier_dir)

    labels = torch.arange(info.num_classes).repeat_interleave(per_class)
    noise = initial_noise(len(labels), 1, info.image_size, seed)
    with Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("steps", total=steps)
        result = sample(OrtDenoiser(engine), load_scheduler(info.scheduler_dir), labels, noise, steps,
                        info.guidance_scale, null_class=info.num_classes,
                        on_step=lambda _: progress.advance(task))

    preds, _ = classify(classifier, result.latents)
    accuracy = float((preds == labels).float().mean())
    save_png(grid_image(to_uint8(result.latents), rows=info.num_classes), out / "grid.png")
    step_ms = [s.seconds * 1e3 for s in result.steps]
    report = {
        "format": "tmpdiff.demo/1",
        "model": "tiny-dit",
        "backend": "onnxruntime-cpu",
        "precision": "fp32",
        "steps": steps,
        "samples": len(labels),
        "batch_per_call": len(labels) * (2 if info.guidance_scale != 1.0 else 1),
        "guidance_scale": info.guidance_scale,
        "seed": seed,
        "step_ms_median": round(statistics.median(step_ms), 3),
        "step_ms": [round(v, 3) for v in step_ms],
        "sampling_seconds": round(result.total_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "classifier_accuracy": round(accuracy, 4),
        "onnx": str(outcomes[0].onnx_path.relative_to(out)),
    }
    write_json(out / "report.json", report)
    return report
