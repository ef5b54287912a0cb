"""`tmpdiff bench`: TMPDiff against every baseline at several speedup targets, on two metrics, judged on all.

Writes bench.json, bench.md and pareto.png. Searches run on the calibration seeds; every row is also judged
on unseen seeds (`unseen_seeds`, default 100, 101, ...) with bootstrap intervals. Where the levels' L^T schedules
are few enough (two levels: T <= 12) the exhaustive optimum is the judge (every schedule by a prefix-cached tree walk,
`calibration.exhaustive`): per budget, optimum vs TMPDiff vs each heuristic on the calibration seeds, TMPDiff
(knapsack and refined) against the optimum of the unseen seeds, the selection floor of those samples, and the
calibration-size curves (`lossy.bench_size_curve`, `split_curve.bench_split_curve`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tmpdiff.calibration.baselines import (
    HEURISTICS,
    cheap_positions,
    evolutionary,
    heuristics_at_budget,
    two_level,
)
from tmpdiff.calibration.evaluator import METRICS
from tmpdiff.calibration.exhaustive import SampleTable, build_table, exhaustive_levels, too_many_to_walk
from tmpdiff.calibration.lossy import bench_size_curve, exhaustive_comparison, reachable, selection_floor, table_problem
from tmpdiff.calibration.matched import UnseenJudge, summarise, unseen_groups
from tmpdiff.calibration.provenance import build_provenance, provenance_line
from tmpdiff.calibration.refine import evaluation_cap, refine
from tmpdiff.calibration.search import (
    CountingProblem,
    Problem,
    Sensitivities,
    measure_sensitivities,
    segment_bisection,
    tmpdiff_search,
)
from tmpdiff.calibration.session import CalibrationSession, check_steps, open_session
from tmpdiff.calibration.split_curve import bench_split_curve
from tmpdiff.formats.atomic import write_bytes, write_json
from tmpdiff.formats.costs import load_costs
from tmpdiff.models.schedulers import sampling_scheduler


def _row(session: CalibrationSession, problem: Problem, name: str, schedule, evaluations: int | None,
         quality: Callable, unseen: UnseenJudge | None = None, real: np.ndarray | None = None) -> dict:
    """Calibration-set figures of a schedule, and with `unseen` its figures on unseen seeds with intervals (`real`:
    the features the Fréchet distance compares with)."""
    e = session.evaluator.evaluate(schedule)
    row = {"method": name, "schedule": list(schedule), "speedup": problem.speedup(schedule),
           "cheap_steps": sum(p != problem.reference for p in schedule), "latent_error": e.latent_error,
           "one_minus_ssim": 1 - e.ssim, "ssim": e.ssim, "psnr": None if e.psnr == float("inf") else e.psnr,
           "evaluations": evaluations, **quality(schedule)}
    row["fallbacks"] = {"calib": e.fallbacks}  # steps that fell back to a higher precision (NaN/Inf output)
    if unseen is not None:
        row["unseen"] = summarise(unseen(schedule), real)
        row["fallbacks"]["unseen"] = unseen.fallbacks[tuple(schedule)]
    return row


def _measured_speedup(session: CalibrationSession, schedule, repeats: int = 3) -> float:
    ref = [session.problem.reference] * session.problem.steps
    times = {}
    for name, z in (("ref", ref), ("z", list(schedule))):
        runs = []
        for _ in range(repeats):
            result = session.evaluator.runner.sample(sampling_scheduler(session.manifest.sampling),
                                                     session.evaluator.labels, session.evaluator.noise, z)
            runs.append(sum(s.seconds for s in result.trace.steps))
        times[name] = statistics.median(runs)
    return times["ref"] / times["z"]


def bench(build_dir: Path, costs_path: Path, out: Path, steps_list: Sequence[int] = (10, 20),
          speedups: Sequence[float] = (1.1, 1.25, 1.4), seeds: Sequence[int] = (0, 1), threads: int | None = None,
          classifier_dir: Path | None = None, on_progress: Callable[[str], None] = lambda _: None,
          reference: str = "fp32", unseen_seeds: Sequence[int] | None = None, exhaustive: bool = True,
          workers: int | None = None, address: str | None = None, exhaustive_at: Sequence[str] | None = None) -> dict:
    """Run the whole comparison and write its outputs; returns the bench dict (its costs' origin in `costs_table`).

    Unseen seeds default to 100, 101, ... (as many as calibration seeds); `exhaustive` adds the judge over every
    schedule of `exhaustive_at` levels (default: the reference and the cheapest) where there are at most 6,561 (two
    levels: budgets of K cheap steps; three or more: `speedups`), with the selection floor of the unseen samples.
    """
    from tmpdiff.eval.quality import real_low_features, sample_quality

    for steps in steps_list:  # every step count before the first one's work (`out` appears with the first write)
        check_steps(steps)
    unseen_seeds = list(unseen_seeds) if unseen_seeds is not None else [100 + i for i in range(len(seeds))]
    groups = unseen_groups(list(seeds), unseen_seeds)
    clf = None if classifier_dir is None else str(classifier_dir)
    real = None if clf is None else real_low_features(clf)
    report: dict = {"costs": str(costs_path), "costs_table": load_costs(costs_path).provenance(), "seeds": list(seeds),
                    "unseen_seeds": unseen_seeds, "runs": []}
    for steps in steps_list:
        session = open_session(build_dir, costs_path, steps, "latent", reference, seeds=seeds, threads=threads,
                               workers=workers, address=address, on_notice=on_progress)
        labels = session.evaluator.labels
        if "build_provenance" not in report:  # once: every step count judges the same engines
            report["build_provenance"] = build_provenance(build_dir, session.manifest, session.problem.all_levels)
        # checked before any search runs: a wrong level is refused in seconds, not after the comparison
        levels = exhaustive_levels(session.problem.all_levels, reference, exhaustive_at, steps) if exhaustive else None
        if exhaustive and levels is None:
            walked = len(set(exhaustive_at)) if exhaustive_at else 2  # default: the reference and the cheapest
            on_progress(f"T={steps}: no exhaustive judge ({too_many_to_walk(walked, steps)})")
        judge_unseen = UnseenJudge(session, groups, clf)

        def quality(schedule, session=session, labels=labels):
            if classifier_dir is None:
                return {}
            return sample_quality(str(classifier_dir), session.evaluator.latents(schedule), labels)

        cheap = session.problem.cheapest
        per_steps: dict = {"steps": steps, "levels": session.problem.all_levels,
                           f"cost_{session.costs.unit}": session.problem.cost,
                           "max_speedup": session.problem.max_speedup(), "targets": []}
        per_steps["skipped_speedups"] = [s for s in speedups if s > session.problem.max_speedup()]
        if per_steps["skipped_speedups"]:
            on_progress(f"T={steps}: targets above the costs table's max speedup "
                        f"({session.problem.max_speedup():.3f}x), skipped: {per_steps['skipped_speedups']}")
        session.problem.prefetch([[p] * steps for p in session.problem.all_levels])
        per_steps["uniform"] = [_row(session, session.problem, f"uniform {p}", [p] * steps, 0, quality, judge_unseen, real)
                                for p in session.problem.all_levels]
        sens_by_metric: dict[str, Sensitivities] = {}
        sens_asked: dict[str, set] = {}  # the schedules each metric's sensitivities measured
        for metric in METRICS:
            on_progress(f"T={steps}: sensitivities on {metric}")
            counting = CountingProblem(session.with_metric(metric))
            sens_by_metric[metric] = measure_sensitivities(counting)
            sens_asked[metric] = set(counting.asked)
            per_steps.setdefault("sensitivity_evaluations", {})[metric] = len(counting.asked)
        for speedup in speedups:
            if speedup > session.problem.max_speedup():
                continue
            budget = session.problem.budget_for_speedup(speedup)
            target: dict = {"speedup": speedup, "rows": []}
            for metric in METRICS:
                on_progress(f"T={steps}: speedup {speedup} on {metric}")
                sens = sens_by_metric[metric]
                # evaluations used: distinct schedules measured, the sensitivities' included (a probe asked again
                # by the search, or a candidate by the refinement, is not measured twice)
                counting = CountingProblem(session.with_metric(metric))
                counting.asked = set(sens_asked[metric])
                schedule, _ = tmpdiff_search(counting, budget, sens)
                spent = len(counting.asked)
                target["rows"].append(_row(session, counting, f"TMPDiff ({metric})", schedule, spent, quality, judge_unseen, real))
                refined = refine(counting, schedule, budget, max(0, evaluation_cap(counting) - spent), sens)
                spent_refined = len(counting.asked)
                target["rows"].append(_row(session, counting, f"TMPDiff refined ({metric})", refined.schedule,
                                           spent_refined, quality, judge_unseen, real))
                bisect = CountingProblem(session.with_metric(metric))
                bisect.asked = set(sens_asked[metric])
                target["rows"].append(_row(session, bisect, f"bisection ({metric})", segment_bisection(bisect, budget, sens),
                                           len(bisect.asked), quality, judge_unseen, real))
                evo_problem = CountingProblem(session.with_metric(metric))  # it may stop short of its allowance
                evo = evolutionary(evo_problem, budget, spent_refined, seed=steps)
                target["rows"].append(_row(session, evo_problem, f"evolutionary ({metric})", evo, len(evo_problem.asked),
                                           quality, judge_unseen, real))
            heuristics = heuristics_at_budget(session.problem, cheap, budget)
            session.problem.prefetch(list(heuristics.values()))
            for kind, schedule in heuristics.items():
                target["rows"].append(_row(session, session.problem, kind, schedule, 0, quality, judge_unseen, real))
            tmp_row = next(r for r in target["rows"] if r["method"] == "TMPDiff (ssim)")
            target["measured_speedup_tmpdiff_ssim"] = _measured_speedup(session, tmp_row["schedule"])
            per_steps["targets"].append(target)
        if levels is not None:
            on_progress(f"T={steps}: exhaustive optimum over {', '.join(levels)} ({len(levels) ** steps} schedules, "
                        "prefix-cached)")
            ev = session.evaluator
            table = build_table(ev.runner, ev.sampling, list(ev.classes), [list(seeds), *groups], levels, reference,
                                steps, clf)
            if len(levels) == 2:
                per_steps["exhaustive"] = _exhaustive_table(table, session.problem, sens_by_metric, levels[1], seeds)
            judged_at = reachable(levels, session.problem.cost, speedups)
            compared = exhaustive_comparison(table, seeds, unseen_seeds, session.problem.cost, reference,
                                             speedups=judged_at)
            per_steps["exhaustive_unseen"] = compared | {
                "selection_floor": selection_floor(table, compared, session.problem.cost),
                "size_curve": bench_size_curve(table, compared, session.problem.cost, reference, judged_at),
                "split_curve": bench_split_curve(table, compared, session.problem.cost, reference, judged_at)}
        if session.evaluator.memo is not None:
            per_steps["calibration_engine_calls"] = session.evaluator.memo.counts()
            on_progress(f"T={steps}: calibration engine calls {session.evaluator.memo.summary()}")
        report["runs"].append(per_steps)
        session.evaluator.close()
    write_json(out / "bench.json", report)
    write_bytes(out / "bench.md", render_markdown(report).encode())
    plot_pareto(report, out / "pareto.png")
    return report


def _exhaustive_table(table: SampleTable, base: Problem, sens_by_metric: dict[str, Sensitivities], cheap: str,
                      seeds: Sequence[int]) -> list[dict]:
    """Per K cheap steps and per metric on the calibration seeds: the optimum, TMPDiff at that K's cost, each heuristic."""
    calib = table.samples_of(seeds)
    rows = []
    for metric in METRICS:
        problem, _ = table_problem(table, calib, base.cost, base.reference, metric)
        schedules = table.schedules
        values = [problem.error(s) for s in schedules]  # the same sums as every compared row (lookups)
        sens = sens_by_metric[metric]
        # restrict the knapsack to the two levels, as the optimum is over two levels
        two_sens = Sensitivities(down={cheap: sens.down[cheap]}, up={problem.reference: sens.up[problem.reference]}
                                 if problem.reference in sens.up else {}, cheap_error=sens.cheap_error)
        for k in range(1, problem.steps):
            with_k = [i for i, s in enumerate(schedules) if sum(p == cheap for p in s) == k]
            best = min(with_k, key=lambda i: values[i])
            budget = problem.schedule_cost([cheap] * k + [problem.reference] * (problem.steps - k))
            schedule, _ = tmpdiff_search(problem, budget * (1 + 1e-9), two_sens)
            row = {"metric": metric, "k": k, "optimum": float(values[best]), "optimum_schedule": list(schedules[best]),
                   "tmpdiff": problem.error(schedule), "tmpdiff_schedule": list(schedule),
                   "tmpdiff_cheap_steps": sum(p == cheap for p in schedule)}
            for kind in HEURISTICS:
                row[kind] = problem.error(two_level(problem, cheap, cheap_positions(kind, problem.steps, k)))
            rows.append(row)
    return rows


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(report: dict) -> str:
    from tmpdiff.calibration.lossy_report import _render_exhaustive, fallback_lines

    costs = report["costs_table"]
    lines = ["# tmpdiff bench", "", f"Costs ({costs['origin']}): {costs['note']}. The speedups in the tables are "
             "the costs table's; measured end-to-end speedups are timed here.", ""]
    if "build_provenance" in report:  # reports written before it was recorded have none
        lines += [provenance_line(report["build_provenance"]), ""]
    if report.get("unseen_seeds"):
        lines += [f"Searches calibrate on seeds {report['seeds']}; the *unseen* columns judge each schedule on seeds "
                  f"{report['unseen_seeds']} the search never saw (mean [95% bootstrap interval] over samples).", ""]
    for run in report["runs"]:
        lines += [f"## T = {run['steps']}, levels {run['levels']}, per-step {costs['unit']} "
                  f"{run['cost_' + costs['unit']]}, max speedup {run['max_speedup']:.3f}", ""]
        header = ["method", "speedup (costs)", "latent err", "1-SSIM", "PSNR", "accuracy", "FD (8-d)", "evaluations",
                  "unseen latent err", "unseen 1-SSIM", "unseen log p(class)", "unseen FD (8-d)", "schedule"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in run["uniform"]:
            lines.append(_table_row(row))
        for target in run["targets"]:
            lines.append(f"| **target {target['speedup']}x** (measured end-to-end for TMPDiff(ssim): "
                         f"{target['measured_speedup_tmpdiff_ssim']:.3f}x) |" + " |" * (len(header) - 1))
            for row in target["rows"]:
                lines.append(_table_row(row))
        lines.append("")
        lines += fallback_lines(run["uniform"] + [r for target in run["targets"] for r in target["rows"]])
        if run.get("skipped_speedups"):  # reports written before it was recorded have none
            lines += [f"Targets above the costs table's max speedup, skipped: {run['skipped_speedups']}", ""]
        if "exhaustive" in run:
            lines += ["### Exhaustive optimum (two levels) vs TMPDiff vs heuristics, per number K of cheap steps "
                      "(calibration seeds)", "",
                      "| metric | K | optimum | TMPDiff | TMPDiff / optimum | " + " | ".join(HEURISTICS) + " |",
                      "|" + "---|" * (5 + len(HEURISTICS))]
            for r in run["exhaustive"]:
                ratio = r["tmpdiff"] / r["optimum"] if r["optimum"] > 0 else float("nan")
                lines.append(f"| {r['metric']} | {r['k']} | {r['optimum']:.4g} | {r['tmpdiff']:.4g} | {ratio:.3f} | "
                             + " | ".join(f"{r[k]:.4g}" for k in HEURISTICS) + " |")
            lines.append("")
        if "exhaustive_unseen" in run:
            lines += ["#" + line if line.startswith("## ") else line
                      for line in _render_exhaustive("exhaustive", run["exhaustive_unseen"])]
    lines += ["![pareto](pareto.png)", ""]
    return "\n".join(lines)


def _ci_cell(unseen: dict | None, key: str) -> str:
    if not unseen or key not in unseen:
        return ""
    d = unseen[key]
    return f"{d['value']:.4g} [{d['low']:.3g}, {d['high']:.3g}]"


def _table_row(row: dict) -> str:
    unseen = row.get("unseen")
    return (f"| {row['method']} | {row['speedup']:.3f} | {_fmt(row['latent_error'])} | {_fmt(row['one_minus_ssim'])} | "
            f"{_fmt(row['psnr'])} | {_fmt(row.get('accuracy'))} | {_fmt(row.get('fd_low'))} | {_fmt(row['evaluations'])} | "
            f"{_ci_cell(unseen, 'latent')} | {_ci_cell(unseen, 'one_minus_ssim')} | {_ci_cell(unseen, 'log_prob')} | "
            f"{_ci_cell(unseen, 'fd_low')} | "
            f"`{' '.join(p.replace('fp32', 'F').replace('int8', 'i8').replace('int4', 'i4') for p in row['schedule'])}` |")


def plot_pareto(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tmpdiff.calibration.report import save_figure

    runs = report["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        rows = list(run["uniform"]) + [r for t in run["targets"] for r in t["rows"]]
        methods = sorted({r["method"] for r in rows})
        for method in methods:
            chosen = [r for r in rows if r["method"] == method]
            ax.scatter([r["speedup"] for r in chosen], [r["ssim"] for r in chosen], label=method, s=22,
                       marker="*" if method.startswith("TMPDiff") else "o")
        ax.set_title(f"T = {run['steps']}")
        ax.set_xlabel("speedup (costs table)")
        ax.set_ylabel("SSIM vs reference")
        ax.legend(fontsize=7)
    fig.suptitle(f"costs {report['costs_table']['note']}", fontsize=8)
    save_figure(fig, path)
