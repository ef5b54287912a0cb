#!/usr/bin/env python
"""Wall time on Ray actors (issue 18): DRiffusion sampling and calibration fan-out against one process.

Part 1, sampling: the sequential sampler in this process (one thread) against N = 2 single-thread Ray actors, each
mode, the same samples (checked bit for bit against the in-process emulation); median of --repeats runs after one
warm-up, Ray start-up and engine loading reported apart. The mode's ideal speedup is T / rounds; what this machine
allows it (`machine_allowed`) uses the last run's per-call times inside the actors, a call alone against a call
beside another, so Ray's own overhead is what separates the measured speedup from it.
Part 3, pipeline (`--parts pipeline --t2i-build BUILD`): the bundled pipeline's call with the drop-in, sequential
against its drafts on Ray actors (the anchor calls in this process), each mode, with --draft-min-alpha.
Part 2, calibration: the same `calibrate` (stated costs, a speedup target) in this process (one thread), on one Ray
actor and on two (one thread each); the search's wall time only (session set-up and Ray start-up apart), and the
schedule and evaluation count of each (they must agree).

  python scripts/bench_ray.py build/tiny-dit --costs costs.json --out results/cpu-epyc-2core/ray_walltime.json

Run it on an idle machine: every figure is a wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from tmpdiff.calibration.calibrate import Target, calibrate
from tmpdiff.calibration.session import open_session
from tmpdiff.engines.device import cpu_name
from tmpdiff.formats.atomic import write_json
from tmpdiff.formats.manifest import load_manifest
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.parallel import ParallelMode, sample_parallel
from tmpdiff.runtime.ray_executor import RayExecutor
from tmpdiff.runtime.runner import initial_noise
from tmpdiff.runtime.trace import StepEvent
from tmpdiff.runtime.workers import InProcessExecutor, WorkerSpec


def _median_seconds(run, repeats: int) -> tuple[float, list[float]]:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def machine_allowed(events: list[StepEvent]) -> dict:
    """What this machine allows a mode, from its last run's trace: each denoiser call's own time inside its actor
    (Ray's transfer and dispatch excluded) alone in a round and beside another call. Two single-thread processes on
    two cores share caches and memory bandwidth, so a call beside another is slower; the speedup the mode could reach
    with zero overhead is T x (a call alone) / sum over rounds of (its slowest call, at those per-call times)."""
    rounds: dict[float, list[float]] = defaultdict(list)
    for event in events:
        rounds[event.start_s].append(event.seconds)
    alone = statistics.median(t for calls in rounds.values() if len(calls) == 1 for t in calls)
    beside = [t for calls in rounds.values() if len(calls) > 1 for t in calls]
    side_by_side = statistics.median(beside) if beside else alone
    wall = sum(alone if len(calls) == 1 else side_by_side for calls in rounds.values())
    return {"call_alone_s": alone, "call_side_by_side_s": side_by_side, "side_by_side_slowdown": side_by_side / alone,
            "machine_allowed_speedup": len(events) * alone / wall}


def bench_sampling(build_dir: Path, samples: int, steps: int, repeats: int, workers: int) -> dict:
    manifest = load_manifest(build_dir)
    s = manifest.sampling
    spec = WorkerSpec(build_dir, "ort", "cpu", ("fp32",), 1, samples, s.channels, s.image_size, s.guidance_scale,
                      s.null_class, s.num_classes)
    labels = torch.arange(samples) % s.num_classes
    noise = initial_noise(samples, s.channels, s.image_size, 0)
    fp32 = ["fp32"] * steps
    torch.set_num_threads(1)
    local = spec.build()
    sequential_s, sequential_all = _median_seconds(
        lambda: local.runner.sample(sampling_scheduler(s), labels, noise, fp32), repeats)
    rows = [{"mode": "sequential", "workers": 1, "rounds": steps, "seconds": sequential_s, "runs": sequential_all}]
    started = time.perf_counter()
    executor = RayExecutor(spec, workers)
    startup = time.perf_counter() - started
    try:
        for mode in ParallelMode:
            emulated = sample_parallel(InProcessExecutor(local, workers), sampling_scheduler(s), labels, noise, fp32, mode)
            got = {}

            def run(mode=mode, got=got):
                got["result"] = sample_parallel(executor, sampling_scheduler(s), labels, noise, fp32, mode)

            seconds, runs = _median_seconds(run, repeats)
            result = got["result"]
            ideal = steps / result.rounds
            machine = machine_allowed(result.trace.steps)
            rows.append({"mode": mode.value, "workers": workers, "rounds": result.rounds, "seconds": seconds,
                         "runs": runs, "speedup": sequential_s / seconds, "ideal_speedup": ideal,
                         "fraction_of_ideal": sequential_s / seconds / ideal, **machine,
                         "fraction_of_machine_allowed": sequential_s / seconds / machine["machine_allowed_speedup"],
                         "same_samples_as_emulation": bool(torch.equal(result.latents, emulated.latents))})
    finally:
        executor.close()
        local.close()
    return {"samples": samples, "steps": steps, "repeats": repeats, "ray_startup_s": startup, "rows": rows}


def bench_pipeline(build_dir: Path, pipeline_dir: Path, prompts: int, steps: int, repeats: int, workers: int,
                   min_alpha: float) -> dict:
    """The drop-in on the bundled pipeline: its sequential call (one thread) against drafts on Ray actors (one
    thread each, the anchor in this process), each mode, the same images as the in-process drafts."""
    import numpy as np

    from tmpdiff.models.colored_digits import held_in_combos
    from tmpdiff.runtime.dropin import attach_engines
    from tmpdiff.runtime.pipeline_io import call_kwargs, load_pipeline

    texts = [c.prompt for c in held_in_combos()[:prompts]]
    torch.set_num_threads(1)

    def attached(parallel: int, mode: str = "conservative", executor: str = "local"):
        pipe = load_pipeline(pipeline_dir)
        denoiser = attach_engines(pipe, build_dir, precision="fp32", parallel=parallel, mode=mode, threads=1,
                                  executor=executor, min_alpha=min_alpha if parallel > 1 else 0.0)

        def kwargs():  # a fresh generator per call: every call samples the same noise
            return {**call_kwargs(pipe, steps=steps, seed=0, guidance_scale=None, text_len=denoiser.adapter.text_len,
                                  sample_size=denoiser.config.get("sample_size")), "output_type": "np"}

        return pipe, denoiser, kwargs

    pipe, denoiser, kwargs = attached(1)
    sequential_s, runs = _median_seconds(lambda: pipe(texts, **kwargs()), repeats)
    denoiser.close()
    rows = [{"mode": "sequential", "workers": 1, "rounds": steps, "seconds": sequential_s, "runs": runs}]
    for mode in ParallelMode:
        pipe, local, kwargs = attached(workers, mode.value)
        want = np.asarray(pipe(texts, **kwargs()).images)
        local.close()
        started = time.perf_counter()
        pipe, remote, kwargs = attached(workers, mode.value, "ray")
        startup = time.perf_counter() - started
        try:
            got = {}

            def run(pipe=pipe, kwargs=kwargs, got=got):
                got["images"] = np.asarray(pipe(texts, **kwargs()).images)

            seconds, runs = _median_seconds(run, repeats)
            rounds = remote.drafts.rounds
            rows.append({"mode": mode.value, "workers": workers, "actors": remote.draft_pool.workers, "rounds": rounds,
                         "seconds": seconds, "runs": runs, "speedup": sequential_s / seconds,
                         "ideal_speedup": steps / rounds, "fraction_of_ideal": sequential_s / seconds / (steps / rounds),
                         "ray_startup_s": startup, "same_images_as_in_process": bool(np.array_equal(got["images"], want))})
        finally:
            remote.close()
    return {"prompts": len(texts), "steps": steps, "repeats": repeats, "min_alpha": min_alpha, "rows": rows}


def bench_calibration(build_dir: Path, costs: Path, steps: int, speedup: float, seeds: list[int]) -> dict:
    rows = []
    for workers in (None, 1, 2):
        started = time.perf_counter()
        session = open_session(build_dir, costs, steps, "ssim", seeds=seeds, threads=1, workers=workers)
        setup = time.perf_counter() - started
        try:
            started = time.perf_counter()
            result = calibrate(session, Target(speedup=speedup), timing_repeats=1)
            seconds = time.perf_counter() - started
            pool = session.evaluator.pool
            rows.append({"workers": workers or 0, "where": "this process" if workers is None else f"{workers} Ray actors",
                         "setup_s": setup, "seconds": seconds, "schedule": list(result.schedule),
                         "evaluations": result.file.evaluations,
                         "schedules_run": session.evaluator.runs + len(session.evaluator.prefetched),
                         "side_by_side": None if pool is None else pool.side_by_side})
        finally:
            session.evaluator.close()
        print(f"calibration on {rows[-1]['where']}: {seconds:.1f} s, {rows[-1]['schedules_run']} schedules run")
    one, two = rows[1]["seconds"], rows[2]["seconds"]
    return {"steps": steps, "speedup_target": speedup, "seeds": seeds, "rows": rows,
            "two_vs_one_actor": one / two, "two_actors_vs_process": rows[0]["seconds"] / two,
            "same_schedule": len({tuple(r["schedule"]) for r in rows}) == 1,
            "same_evaluations": len({r["evaluations"] for r in rows}) == 1}


def _rates(row: dict) -> list[str]:
    """Speedup, the mode's ideal one and the fraction of it (1 for the sequential row)."""
    return [f"{row.get('speedup', 1):.2f}x", f"{row.get('ideal_speedup', 1):.2f}x", f"{row.get('fraction_of_ideal', 1):.0%}"]


def print_rows(header: list[str], rows: list[list]) -> None:
    """A markdown table on stdout."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build_dir", type=Path, help="build with fp32 (and the costs table's levels) built for ORT")
    parser.add_argument("--costs", type=Path, required=True, help="costs table for the calibration part")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=40, help="sampling part: batch per denoiser call")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calib-speedup", type=float, default=1.6)
    parser.add_argument("--calib-seeds", default="0,1")
    parser.add_argument("--parts", default="sampling,calibration", help="of sampling, calibration, pipeline")
    parser.add_argument("--t2i-build", type=Path, help="pipeline part: the bundled pipeline's build (fp32 built)")
    parser.add_argument("--prompts", type=int, default=8, help="pipeline part: held-in prompts per call")
    parser.add_argument("--min-alpha", type=float, default=0.6, help="pipeline part: --draft-min-alpha")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    report: dict = {"format": "tmpdiff.bench_ray/1", "machine": cpu_name(), "threads_per_worker": 1}
    if args.out.is_file():  # a part run again keeps the other part's figures
        report = json.loads(args.out.read_text()) | report
    if "sampling" in parts:
        report["sampling"] = bench_sampling(args.build_dir, args.samples, args.steps, args.repeats, 2)
        write_json(args.out, report)
        print_rows(["mode", "N", "rounds", "median s", "speedup", "ideal", "of ideal", "call beside another",
                    "machine allows", "of that"],
                   [[r["mode"], r["workers"], r["rounds"], f"{r['seconds']:.3f}", *_rates(r),
                     f"{r.get('side_by_side_slowdown', 1):.2f}x slower", f"{r.get('machine_allowed_speedup', 1):.2f}x",
                     f"{r.get('fraction_of_machine_allowed', 1):.0%}"] for r in report["sampling"]["rows"]])
        print(f"Ray start-up and engine loading: {report['sampling']['ray_startup_s']:.1f} s")
    if "pipeline" in parts:
        if args.t2i_build is None:
            parser.error("the pipeline part needs --t2i-build")
        from tmpdiff.models.tiny_t2i import t2i_dir

        report["pipeline"] = bench_pipeline(args.t2i_build, t2i_dir(), args.prompts, args.steps, args.repeats, 2,
                                            args.min_alpha)
        write_json(args.out, report)
        print_rows(["pipeline mode", "N", "actors", "rounds", "median s", "speedup", "ideal", "of ideal", "same images"],
                   [[r["mode"], r["workers"], r.get("actors", 0), r["rounds"], f"{r['seconds']:.3f}", *_rates(r),
                     r.get("same_images_as_in_process", True)] for r in report["pipeline"]["rows"]])
    if "calibration" in parts:
        seeds = [int(v) for v in args.calib_seeds.split(",")]
        report["calibration"] = bench_calibration(args.build_dir, args.costs, args.steps, args.calib_speedup, seeds)
        c = report["calibration"]
        print(f"calibration: 2 actors vs 1 {c['two_vs_one_actor']:.2f}x, vs this process {c['two_actors_vs_process']:.2f}x;"
              f" same schedule {c['same_schedule']}, same evaluations {c['same_evaluations']}")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
