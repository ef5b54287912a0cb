"""`tmpdiff bench`: TMPDiff against every baseline at several speedup targets, on two metrics, judged on all.

Writes bench.json, bench.md and pareto.png. For T <= 12 with two levels the exhaustive optimum is the
judge: for each number K of cheap steps, optimum vs TMPDiff vs each heuristic.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from tmpdiff.calibration.baselines import (
    HEURISTICS,
    cheap_positions,
    evolutionary,
    exhaustive_two_level,
    heuristics_at_budget,
    two_level,
)
from tmpdiff.calibration.evaluator import METRICS
from tmpdiff.calibration.search import Problem, Sensitivities, measure_sensitivities, segment_bisection, tmpdiff_search
from tmpdiff.calibration.session import CalibrationSession, open_session
from tmpdiff.formats.atomic import write_bytes, write_json
from tmpdiff.formats.costs import load_costs
from tmpdiff.models.schedulers import sampling_scheduler


class CountingProblem(Problem):
    """A Problem whose evaluate records which distinct schedules a search asked for."""

    def __init__(self, base: Problem) -> None:
        super().__init__(base.steps, base.reference, base.levels, base.cost, base.metric, base.evaluate)
        self.asked: set[tuple[str, ...]] = set()
        inner = base.evaluate

        def counted(schedule):
            self.asked.add(tuple(schedule))
            return inner(schedule)

        self.evaluate = counted


def _row(session: CalibrationSession, problem: Problem, name: str, schedule, evaluations: int | None,
         quality: Callable) -> dict:
    e = session.evaluator.evaluate(schedule)
    return {"method": name, "schedule": list(schedule), "speedup": problem.speedup(schedule),
            "cheap_steps": sum(p != problem.reference for p in schedule), "latent_error": e.latent_error,
            "one_minus_ssim": 1 - e.ssim, "ssim": e.ssim, "psnr": None if e.psnr == float("inf") else e.psnr,
            "evaluations": evaluations, **quality(schedule)}


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
          reference: str = "fp32") -> dict:
    """Run the whole comparison and write its outputs; returns the bench dict (its costs' origin in `costs_table`)."""
    from tmpdiff.eval.quality import sample_quality

    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"costs": str(costs_path), "costs_table": load_costs(costs_path).provenance(), "seeds": list(seeds),
                    "runs": []}
    for steps in steps_list:
        session = open_session(build_dir, costs_path, steps, "latent", reference, seeds=seeds, threads=threads)
        labels = session.evaluator.labels

        def quality(schedule, session=session, labels=labels):
            if classifier_dir is None:
                return {}
            return sample_quality(str(classifier_dir), session.evaluator.latents(schedule), labels)

        cheap = session.problem.cheapest
        per_steps: dict = {"steps": steps, "levels": session.problem.all_levels,
                           f"cost_{session.costs.unit}": session.problem.cost,
                           "max_speedup": session.problem.max_speedup(), "targets": []}
        per_steps["uniform"] = [_row(session, session.problem, f"uniform {p}", [p] * steps, 0, quality)
                                for p in session.problem.all_levels]
        sens_by_metric: dict[str, Sensitivities] = {}
        for metric in METRICS:
            on_progress(f"T={steps}: sensitivities on {metric}")
            counting = CountingProblem(session.with_metric(metric))
            sens_by_metric[metric] = measure_sensitivities(counting)
            per_steps.setdefault("sensitivity_evaluations", {})[metric] = len(counting.asked)
        for speedup in speedups:
            if speedup > session.problem.max_speedup():
                continue
            budget = session.problem.budget_for_speedup(speedup)
            target: dict = {"speedup": speedup, "rows": []}
            for metric in METRICS:
                on_progress(f"T={steps}: speedup {speedup} on {metric}")
                sens = sens_by_metric[metric]
                counting = CountingProblem(session.with_metric(metric))
                schedule, _ = tmpdiff_search(counting, budget, sens)
                spent = per_steps["sensitivity_evaluations"][metric] + len(counting.asked)
                target["rows"].append(_row(session, counting, f"TMPDiff ({metric})", schedule, spent, quality))
                bisect = CountingProblem(session.with_metric(metric))
                target["rows"].append(_row(session, bisect, f"bisection ({metric})", segment_bisection(bisect, budget, sens),
                                           per_steps["sensitivity_evaluations"][metric] + len(bisect.asked), quality))
                evo_problem = session.with_metric(metric)
                target["rows"].append(_row(session, evo_problem, f"evolutionary ({metric})",
                                           evolutionary(evo_problem, budget, spent, seed=steps), spent, quality))
            for kind, schedule in heuristics_at_budget(session.problem, cheap, budget).items():
                target["rows"].append(_row(session, session.problem, kind, schedule, 0, quality))
            tmp_row = next(r for r in target["rows"] if r["method"] == "TMPDiff (ssim)")
            target["measured_speedup_tmpdiff_ssim"] = _measured_speedup(session, tmp_row["schedule"])
            per_steps["targets"].append(target)
        if steps <= 12:
            on_progress(f"T={steps}: exhaustive two-level optimum ({2 ** steps} schedules)")
            per_steps["exhaustive"] = _exhaustive_table(session, sens_by_metric, cheap)
        report["runs"].append(per_steps)
        session.evaluator.runner.close()
    write_json(out / "bench.json", report)
    write_bytes(out / "bench.md", render_markdown(report).encode())
    plot_pareto(report, out / "pareto.png")
    return report


def _exhaustive_table(session: CalibrationSession, sens_by_metric: dict[str, Sensitivities], cheap: str) -> list[dict]:
    """Per K cheap steps and per metric: the optimum, TMPDiff at that K's cost, and each heuristic."""
    two = Problem(session.problem.steps, session.problem.reference, [cheap], session.problem.cost, "latent",
                  session.problem.evaluate)
    rows = []
    for metric in METRICS:
        problem = Problem(two.steps, two.reference, two.levels, two.cost, metric, two.evaluate)
        optimum = exhaustive_two_level(problem, cheap)
        sens = sens_by_metric[metric]
        # restrict the knapsack to the two levels, as the optimum is over two levels
        two_sens = Sensitivities(down={cheap: sens.down[cheap]}, up={problem.reference: sens.up[problem.reference]}
                                 if problem.reference in sens.up else {}, cheap_error=sens.cheap_error)
        for k in range(1, problem.steps):
            budget = problem.schedule_cost([cheap] * k + [problem.reference] * (problem.steps - k))
            schedule, _ = tmpdiff_search(problem, budget * (1 + 1e-9), two_sens)
            row = {"metric": metric, "k": k, "optimum": optimum[k][1], "optimum_schedule": list(optimum[k][0]),
                   "tmpdiff": problem.error(schedule), "tmpdiff_schedule": list(schedule),
                   "tmpdiff_cheap_steps": sum(p == cheap for p in schedule)}
            for kind in HEURISTICS:
                row[kind] = problem.error(two_level(problem, cheap, cheap_positions(kind, problem.steps, k)))
            rows.append(row)
    return rows


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(report: dict) -> str:
    costs = report["costs_table"]
    lines = ["# tmpdiff bench", "", f"Costs ({costs['origin']}): {costs['note']}. The speedups in the tables are "
             "the costs table's; measured end-to-end speedups are timed here.", ""]
    for run in report["runs"]:
        lines += [f"## T = {run['steps']}, levels {run['levels']}, per-step {costs['unit']} "
                  f"{run['cost_' + costs['unit']]}, max speedup {run['max_speedup']:.3f}", ""]
        header = ["method", "speedup (costs)", "latent err", "1-SSIM", "PSNR", "accuracy", "FD", "evaluations", "schedule"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in run["uniform"]:
            lines.append(_table_row(row))
        for target in run["targets"]:
            lines.append(f"| **target {target['speedup']}x** (measured end-to-end for TMPDiff(ssim): "
                         f"{target['measured_speedup_tmpdiff_ssim']:.3f}x) |" + " |" * (len(header) - 1))
            for row in target["rows"]:
                lines.append(_table_row(row))
        lines.append("")
        if "exhaustive" in run:
            lines += ["### Exhaustive optimum (two levels) vs TMPDiff vs heuristics, per number K of cheap steps", "",
                      "| metric | K | optimum | TMPDiff | TMPDiff / optimum | " + " | ".join(HEURISTICS) + " |",
                      "|" + "---|" * (5 + len(HEURISTICS))]
            for r in run["exhaustive"]:
                ratio = r["tmpdiff"] / r["optimum"] if r["optimum"] > 0 else float("nan")
                lines.append(f"| {r['metric']} | {r['k']} | {r['optimum']:.4g} | {r['tmpdiff']:.4g} | {ratio:.3f} | "
                             + " | ".join(f"{r[k]:.4g}" for k in HEURISTICS) + " |")
            lines.append("")
    lines += ["![pareto](pareto.png)", ""]
    return "\n".join(lines)


def _table_row(row: dict) -> str:
    return (f"| {row['method']} | {row['speedup']:.3f} | {_fmt(row['latent_error'])} | {_fmt(row['one_minus_ssim'])} | "
            f"{_fmt(row['psnr'])} | {_fmt(row.get('accuracy'))} | {_fmt(row.get('fd'))} | {_fmt(row['evaluations'])} | "
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
