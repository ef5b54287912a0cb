"""`tmpdiff demo`: the bundled model through the whole pipeline on CPU.

export (every precision) -> build ORT engines -> profile -> calibrate a schedule for a speedup target ->
sample a grid with the reference, the cheapest uniform precision and the schedule -> report.md + report.json.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from tmpdiff.calibration.calibrate import Target, calibrate
from tmpdiff.calibration.report import write_calibration_report
from tmpdiff.calibration.session import open_session
from tmpdiff.commands.run import RunRequest, run
from tmpdiff.engines.build import build_engines
from tmpdiff.engines.profile import profile_build
from tmpdiff.eval.classifier import DigitClassifier, classify
from tmpdiff.eval.images import grid_image, save_png
from tmpdiff.export.exporter import export_model
from tmpdiff.formats.atomic import write_bytes, write_json
from tmpdiff.formats.costs import save_costs
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.schedule import save_schedule
from tmpdiff.models.bundled import load_model_info, sampling_info
from tmpdiff.models.digits import to_uint8
from tmpdiff.runtime.capture import sampled_recipe

DEFAULT_PRECISIONS = ("fp32", "fp16", "int8", "fp8", "int4")


def _sample_grid(build_dir: Path, classes: list[int], seed: int, steps: int, threads: int | None, schedule_path=None,
                 precision=None, progress=None) -> tuple[torch.Tensor, list]:
    request = RunRequest(build_dir=build_dir, classes=classes, seed=seed, steps=steps, schedule_path=schedule_path,
                         precision=precision, threads=threads)
    result, _, _ = run(request, on_step=progress)
    return result.latents, result.trace.steps


def check_demo_request(steps: int | None, seed: int) -> None:
    """What sampling would refuse after the export, build and calibration (`steps` None: the model's default):
    checked first, minutes earlier."""
    from tmpdiff.models.schedulers import check_distinct_timesteps, sampling_scheduler
    from tmpdiff.runtime.runner import check_seeds

    check_seeds([seed])
    info = load_model_info()
    steps = steps or info.default_steps
    try:
        check_distinct_timesteps(sampling_scheduler(sampling_info(info)), steps)
    except TmpdiffError as exc:
        raise TmpdiffError(f"--steps {steps}: {exc}") from None


def run_demo(out: Path, per_class: int = 4, steps: int | None = None, seed: int = 0, threads: int | None = None,
             precisions: tuple[str, ...] = DEFAULT_PRECISIONS, speedup: float | None = None,
             console: Console | None = None) -> dict:
    """Run the pipeline on the bundled model and write grids, costs, schedule, calibration report and report.md."""
    console = console or Console(stderr=True)
    info = load_model_info()
    steps = steps or info.default_steps
    check_demo_request(steps, seed)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 2)
        console.print(f"[bold]{name}[/bold] done in {timings[name]:.1f} s")
        return time.perf_counter()

    sampling = sampling_info(info)
    t = time.perf_counter()
    build_dir, exports = export_model(
        info.transformer_dir, out / "build", list(precisions), model_id="tiny-dit",
        calibration=sampled_recipe(sampling, range(info.num_classes), [0, 1]),
        sampling=sampling, on_progress=lambda msg: console.print(f"export {msg}"))
    t = stage("export", t)
    build_engines(build_dir, "ort", "cpu", threads=threads, on_progress=lambda msg: console.print(f"build {msg}"))
    t = stage("build", t)
    calib_seeds = [0, 1]
    batch = 2 * info.num_classes * len(calib_seeds)  # cond + uncond rows of the calibration set
    costs = profile_build(build_dir, "ort", "cpu", batch=batch, warmup=2, repeats=10, threads=threads)
    save_costs(costs, out / "costs.json")
    t = stage("profile", t)

    session = open_session(build_dir, out / "costs.json", steps, "ssim", seeds=calib_seeds, threads=threads)
    max_speedup = session.problem.max_speedup()
    target_speedup = speedup or round(1 + 0.6 * (max_speedup - 1), 3)
    result = calibrate(session, Target(speedup=target_speedup))
    save_schedule(result.file, out / "schedule.json")
    write_calibration_report(session, result, out / "calibration")
    session.evaluator.runner.close()
    t = stage("calibrate", t)

    classifier = DigitClassifier.load(info.classifier_dir)
    classes = [c for c in range(info.num_classes) for _ in range(per_class)]
    labels = torch.tensor(classes)
    runs = {"reference (fp32)": {"precision": "fp32"},
            f"uniform {session.problem.cheapest}": {"precision": session.problem.cheapest},
            "TMPDiff schedule": {"schedule_path": out / "schedule.json"}}
    rows = {}
    for name, how in runs.items():
        latents, events = _sample_grid(build_dir, classes, seed, steps, threads, **how)
        preds, _ = classify(classifier, latents)
        file = "grid.png" if name.startswith("reference") else f"grid_{name.split()[0].lower()}.png"
        save_png(grid_image(to_uint8(latents), rows=info.num_classes), out / file)
        step_ms = [e.seconds * 1e3 for e in events]
        rows[name] = {"image": file, "accuracy": float((preds == labels).float().mean()),
                      "step_ms_median": statistics.median(step_ms), "total_ms": sum(step_ms),
                      "precisions": [e.precision for e in events], "step_ms": [round(v, 3) for v in step_ms]}
    stage("sample", t)

    reference = rows["reference (fp32)"]
    report = {
        "format": "tmpdiff.demo/1", "model": "tiny-dit", "backend": "onnxruntime-cpu", "device": costs.device,
        "steps": steps, "samples": len(classes), "batch_per_call": 2 * len(classes) if info.guidance_scale != 1 else len(classes),
        "guidance_scale": info.guidance_scale, "seed": seed,
        "precision": "fp32", "step_ms_median": round(reference["step_ms_median"], 3), "step_ms": reference["step_ms"],
        "sampling_seconds": round(reference["total_ms"] / 1e3, 3), "classifier_accuracy": round(reference["accuracy"], 4),
        "total_seconds": round(time.perf_counter() - started, 2), "stage_seconds": timings,
        "exports": {o.precision: {"parity_error": o.entry.parity_error, "error_vs_fp32": o.entry.error_vs_fp32}
                    for o in exports},
        "costs_ms": {p: c.median_ms for p, c in costs.precisions.items()},
        "schedule": result.file.model_dump(mode="json"),
        "runs": rows,
    }
    write_json(out / "report.json", report)
    write_bytes(out / "report.md", _markdown(report, session.problem.levels).encode())
    return report


def _markdown(report: dict, levels: list[str]) -> str:
    schedule = report["schedule"]
    ref_total = report["runs"]["reference (fp32)"]["total_ms"]
    lines = [
        "# tmpdiff demo", "",
        f"Bundled tiny DiT, {report['steps']} steps, {report['samples']} samples (batch {report['batch_per_call']} per "
        f"engine call with guidance), ONNX Runtime on {report['device']}.", "",
        "## Step latency per precision (`tmpdiff profile`, median of 10, calibration batch)", "",
        "| precision | ms | vs fp32 | ORT vs torch parity | error vs fp32 |", "|---|---|---|---|---|",
    ]
    for name, ms in report["costs_ms"].items():
        ex = report["exports"].get(name, {})
        lines.append(f"| {name} | {ms:.2f} | {ms / report['costs_ms']['fp32']:.2f} | {ex.get('parity_error', 0):.1e} | "
                     f"{ex.get('error_vs_fp32', 0):.2e} |")
    lines += ["", f"Levels cheaper than fp32 here (the search uses only these): {', '.join(levels)}.", "",
              "## Schedule (calibrated on 1 - SSIM)", "",
              f"`{' '.join(schedule['precisions'])}`", "",
              f"target {schedule['target']}, predicted speedup {schedule['predicted']['speedup']:.3f}x, measured SSIM "
              f"{schedule['measured']['ssim']:.4f} vs the fp32 reference, {schedule['evaluations']} evaluations. "
              "Validation of the additivity scores: [calibration/calibration_report.md](calibration/calibration_report.md).",
              "", "## Side by side", "", "| run | classifier accuracy | median step ms | total ms | speedup (measured) | grid |",
              "|---|---|---|---|---|---|"]
    for name, row in report["runs"].items():
        lines.append(f"| {name} | {row['accuracy']:.1%} | {row['step_ms_median']:.1f} | {row['total_ms']:.0f} | "
                     f"{ref_total / row['total_ms']:.3f} | ![{name}]({row['image']}) |")
    lines += ["", f"Stage times (s): {report['stage_seconds']}; total {report['total_seconds']:.0f} s.", ""]
    return "\n".join(lines)
