#!/usr/bin/env python
"""What the engine-call memo saves a search: the same searches with and without `CallMemo`, in one run.

On the bundled DiT build (the levels of its costs table), at one step count and speedup target: sensitivities, the
knapsack answer, its refinement (to the 3·T·L cap) and the evolutionary baseline at the refinement's evaluations,
each on both metrics (`--metrics`) - what `tmpdiff bench` runs per target. Once with the evaluator's memo, once
without (fresh sessions, --repeats rounds, the order swapped every other round); wall time of the searches (session
set-up apart), engine calls run and reused, and a check that both found the same schedules with the same errors (the
memo is exact).

  python scripts/bench_call_memo.py build/tiny-dit --costs costs-gpu-like.json --out results/cpu-epyc-2core/call_memo.json

Run it on an idle machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from tmpdiff.calibration.baselines import evolutionary
from tmpdiff.calibration.evaluator import METRICS
from tmpdiff.calibration.refine import evaluation_cap, refine
from tmpdiff.calibration.search import CountingProblem, measure_sensitivities, tmpdiff_search
from tmpdiff.calibration.session import open_session
from tmpdiff.engines.device import cpu_name
from tmpdiff.formats.atomic import write_json


def searches(build: Path, costs: Path, steps: int, speedup: float, seeds: list[int], metrics: list[str], memo: bool
             ) -> dict:
    """One round: every search of a bench target on both metrics; wall time, engine calls, what was found."""
    session = open_session(build, costs, steps, "latent", seeds=seeds)
    ev = session.evaluator
    if not memo:
        ev.memo = None
    try:
        budget = session.problem.budget_for_speedup(speedup)
        found = {}
        started = time.perf_counter()
        for metric in metrics:
            counting = CountingProblem(session.with_metric(metric))
            sens = measure_sensitivities(counting)
            start, _ = tmpdiff_search(counting, budget, sens)
            refined = refine(counting, start, budget, max(0, evaluation_cap(counting) - len(counting.asked)), sens)
            spent = len(counting.asked)
            evo = evolutionary(session.with_metric(metric), budget, spent, seed=steps)
            found[metric] = {"refined": list(refined.schedule), "refined_error": refined.error,
                             "evolutionary": list(evo), "evolutionary_error": session.with_metric(metric).error(evo),
                             "evaluations": spent}
        seconds = time.perf_counter() - started
        calls = ev.memo.counts() if ev.memo is not None else None
        return {"memo": memo, "seconds": seconds, "schedules_run": ev.runs, "engine_calls": calls, "found": found}
    finally:
        ev.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path)
    parser.add_argument("--costs", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--speedup", type=float, default=1.25)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--metrics", default=",".join(METRICS), help="comma-separated, of " + ", ".join(METRICS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    metrics = args.metrics.split(",")
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        parser.error(f"unknown metric {unknown[0]}: choose from {', '.join(METRICS)}")
    rounds = []
    for i in range(args.repeats):
        order = (True, False) if i % 2 == 0 else (False, True)
        for memo in order:
            rounds.append(searches(args.build, args.costs, args.steps, args.speedup, seeds, metrics, memo))
            print(f"round {i}, memo {memo}: {rounds[-1]['seconds']:.1f} s, {rounds[-1]['schedules_run']} schedules run,"
                  f" engine calls {rounds[-1]['engine_calls']}", flush=True)
    with_memo = [r for r in rounds if r["memo"]]
    without = [r for r in rounds if not r["memo"]]
    same = all(r["found"] == with_memo[0]["found"] for r in rounds)
    median_on = statistics.median(r["seconds"] for r in with_memo)
    median_off = statistics.median(r["seconds"] for r in without)
    calls = with_memo[0]["engine_calls"]
    report = {"machine": cpu_name(), "build": str(args.build), "costs": str(args.costs), "steps": args.steps,
              "speedup": args.speedup, "seeds": seeds, "metrics": metrics, "repeats": args.repeats, "rounds": rounds,
              "median_seconds_with_memo": median_on, "median_seconds_without": median_off,
              "wall_ratio": median_off / median_on, "engine_calls_reused_fraction": calls["reused"] / sum(calls.values()),
              "same_schedules_and_errors": same}
    write_json(args.out, report)
    print(f"{args.steps} steps, target {args.speedup}x: without memo {median_off:.1f} s, with {median_on:.1f} s "
          f"({median_off / median_on:.2f}x); {calls['reused']} of {sum(calls.values())} engine calls reused; "
          f"same schedules and errors: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
