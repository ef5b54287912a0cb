"""`tmpdiff demo --t2i`: the bundled text-to-image pipeline through the whole pipeline on CPU.

export with prompt capture -> build ORT engines -> profile -> calibrate a schedule inside the pipeline -> a grid of
one prompt per digit with fp32, the cheapest uniform precision and the schedule -> t2i/report.md + report.json.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from tmpdiff.calibration.calibrate import Target
from tmpdiff.commands.calibrate_pipeline import calibrate_pipeline
from tmpdiff.commands.export import calibration_for, resolve_model_dir
from tmpdiff.commands.run_prompts import PromptRequest, run_prompts
from tmpdiff.engines.build import build_engines
from tmpdiff.engines.profile import profile_build
from tmpdiff.eval.attributes import AttributeClassifier
from tmpdiff.eval.images import grid_image, save_png
from tmpdiff.eval.t2i import judge
from tmpdiff.export.exporter import export_model
from tmpdiff.formats.atomic import write_bytes, write_json
from tmpdiff.formats.costs import save_costs
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.schedule import save_schedule
from tmpdiff.models.colored_digits import COLOUR_NAMES, Combo, held_in_combos, parse_prompt
from tmpdiff.models.tiny_t2i import CLASSIFIER_SUBFOLDER, DEFAULT_STEPS, TEXT_LEN, t2i_dir

PRECISIONS = ("fp32", "int8", "fp8", "int4")


def _grid_prompts(per_digit: int, seed: int) -> list[str]:
    """`per_digit` held-in prompts for each digit, colours drawn with `seed`."""
    rng = random.Random(seed)
    combos = held_in_combos()
    return [rng.choice([c for c in combos if c.digit == d]).prompt for d in range(10) for _ in range(per_digit)]


def run_t2i_demo(out: Path, steps: int | None = None, seed: int = 0, threads: int | None = None,
                 speedup: float | None = None, calib_prompts: int = 8, per_digit: int = 2,
                 console: Console | None = None) -> dict:
    """Export, build, profile and calibrate the bundled text-to-image pipeline; grids and a report under `out`."""
    console = console or Console(stderr=True)
    steps = steps or DEFAULT_STEPS
    started, timings = time.perf_counter(), {}

    def stage(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 2)
        console.print(f"[bold]t2i {name}[/bold] done in {timings[name]:.1f} s")
        return time.perf_counter()

    out.mkdir(parents=True, exist_ok=True)
    prompts_file = out / "calibration_prompts.txt"
    calibration = random.Random(seed + 1).sample([c.prompt for c in held_in_combos()], calib_prompts)
    write_bytes(prompts_file, ("\n".join(calibration) + "\n").encode())
    t = time.perf_counter()
    model_dir = resolve_model_dir("bundled-t2i", None)
    recipe, _ = calibration_for(model_dir, [seed], None, prompts=prompts_file, steps=steps)
    build_dir, exports = export_model(model_dir, out / "build", list(PRECISIONS), model_id="tiny-t2i", calibration=recipe,
                                      graph_sizes={"text_len": TEXT_LEN},
                                      on_progress=lambda m: console.print(f"t2i export {m}"))
    t = stage("export", t)
    build_engines(build_dir, "ort", "cpu", threads=threads, on_progress=lambda m: console.print(f"t2i build {m}"))
    t = stage("build", t)
    costs = profile_build(build_dir, "ort", "cpu", batch=2 * calib_prompts, warmup=2, repeats=10, threads=threads)
    save_costs(costs, out / "costs.json")
    t = stage("profile", t)

    cheapest = min((p for p in costs.precisions if p != "fp32"), key=lambda p: costs.precisions[p].median_ms)
    max_speedup = costs.precisions["fp32"].median_ms / costs.precisions[cheapest].median_ms
    if max_speedup <= 1.0:
        raise TmpdiffError(f"no precision is cheaper than fp32 on this machine ({costs.device})", out / "costs.json")
    target = speedup or round(1 + 0.6 * (max_speedup - 1), 3)
    result, session, judged = calibrate_pipeline(build_dir, out / "costs.json", t2i_dir(), prompts_file, [seed],
                                                 Target(speedup=target), steps=steps, metric="ssim", threads=threads,
                                                 report=out / "calibration")
    save_schedule(result.file, out / "schedule.json")
    t = stage("calibrate", t)

    classifier = AttributeClassifier.load(t2i_dir() / CLASSIFIER_SUBFOLDER)
    prompts = _grid_prompts(per_digit, seed)
    combos: list[Combo] = [parse_prompt(p) for p in prompts]
    runs = {"reference (fp32)": {"precision": "fp32", "steps": steps},
            f"uniform {session.problem.cheapest}": {"precision": session.problem.cheapest, "steps": steps},
            "TMPDiff schedule": {"schedule_path": out / "schedule.json"}}
    rows, images = {}, {}
    for name, how in runs.items():
        request = PromptRequest(build_dir=build_dir, pipeline_dir=t2i_dir(), prompts=prompts, seed=seed,
                                threads=threads, device="cpu", **how)
        pixels, denoiser, _ = run_prompts(request)
        images[name] = pixels
        judged_run = judge(classifier, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, combos)
        step_ms = [e.seconds * 1e3 for e in denoiser.trace.steps]
        rows[name] = {"adherence": judged_run["adherence"], "samples": len(prompts),
                      "step_ms_median": statistics.median(step_ms), "total_ms": sum(step_ms),
                      "precisions": [e.precision for e in denoiser.trace.steps]}
    save_png(grid_image(np.concatenate(list(images.values())), rows=len(images)), out / "grid.png")
    stage("sample", t)

    report = {"format": "tmpdiff.demo-t2i/1", "model": "tiny-t2i (PixArtSigmaPipeline)", "device": costs.device,
              "steps": steps, "seed": seed, "grid_prompts": prompts, "calibration_prompts": calibration,
              "costs_ms": {p: c.median_ms for p, c in costs.precisions.items()},
              "exports": {o.precision: {"error_vs_fp32": o.entry.error_vs_fp32} for o in exports},
              "schedule": result.file.model_dump(mode="json"), "calibration_judged": judged, "runs": rows,
              "stage_seconds": timings, "total_seconds": round(time.perf_counter() - started, 2)}
    write_json(out / "report.json", report)
    write_bytes(out / "report.md", _markdown(report).encode())
    return report


def _markdown(report: dict) -> str:
    schedule = report["schedule"]
    lines = ["# tmpdiff demo: text-to-image", "",
             f"Bundled tiny PixArt-Sigma pipeline, {report['steps']} steps, guidance 4.5, ONNX Runtime on "
             f"{report['device']}. Quantization calibrated on the pipeline's own denoiser inputs over "
             f"{len(report['calibration_prompts'])} prompts.", "",
             "| precision | step ms (profile) | error vs fp32 (export) |", "|---|---|---|"]
    for name, ms in report["costs_ms"].items():
        lines.append(f"| {name} | {ms:.2f} | {report['exports'].get(name, {}).get('error_vs_fp32', 0):.2e} |")
    measured = schedule["measured"]
    lines += ["", "## Schedule (calibrated inside the pipeline on 1 - SSIM over RGB)", "",
              f"`{' '.join(schedule['precisions'])}`", "",
              f"predicted speedup {schedule['predicted']['speedup']:.3f}x, measured {measured['speedup']:.3f}x; SSIM "
              f"{measured['ssim']:.4f} vs fp32 on the calibration prompts, {schedule['evaluations']} evaluations.", "",
              f"## Grid (rows: {', '.join(report['runs'])}; {len(report['grid_prompts'])} held-in prompts, "
              f"{', '.join(COLOUR_NAMES)} colours)", "", "![grid](grid.png)", "",
              "| run | prompt adherence | median step ms | total ms |", "|---|---|---|---|"]
    for name, row in report["runs"].items():
        lines.append(f"| {name} | {row['adherence']:.1%} of {row['samples']} | {row['step_ms_median']:.1f} | "
                     f"{row['total_ms']:.0f} |")
    lines += ["", f"Stage times (s): {report['stage_seconds']}; total {report['total_seconds']:.0f} s.", ""]
    return "\n".join(lines)
