"""`tmpdiff bench BUILD --pipeline DIR --prompts FILE` (or `--calib-classes` for a pipeline that takes class labels,
DiTPipeline): TMPDiff inside a diffusers pipeline, against uniform precisions, the heuristics and the evolutionary
search, searched on calibration prompts (class labels) x seeds and judged on unseen prompts (labels) x seeds.

Per step count: every uniform level; per speedup target, on each metric (latent, ssim), the knapsack and refined
TMPDiff schedules, the evolutionary search given the refined search's evaluations, and the heuristics at the same
budget (`search_matched`). Every schedule is judged on the calibration set (what the search saw) and on the unseen
set, per sample against the fp32 images of the same prompt and seed: latent error, 1 - SSIM and PSNR of the decoded
RGB images, prompt adherence (all attributes right, when the pipeline ships an attribute classifier) with 95%
bootstrap intervals (resampling prompts, all seeds of one together: a prompt's errors under its seeds correlate;
class labels likewise), and the Fréchet distance to the fp32 images in the classifier's features (jackknife interval,
over samples). A class-label pipeline has no judge beyond the fp32 images (no ImageNet classifier ships).
Refined TMPDiff is compared with every other row of its target by paired differences (prompts resampled, paired),
and its denoiser time is measured against the all-reference schedule's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from tmpdiff.calibration.exhaustive import exhaustive_levels, save_table
from tmpdiff.calibration.lossy import bench_size_curve, exhaustive_comparison, reachable, selection_floor
from tmpdiff.calibration.lossy_report import _render_exhaustive, fallback_lines
from tmpdiff.calibration.matched import compare, format_percent, search_matched, summarise
from tmpdiff.calibration.pipeline_exhaustive import build_pipeline_table
from tmpdiff.calibration.pipeline_session import PipelineEvaluator, PipelineSession, attribute_judge, open_pipeline_session
from tmpdiff.calibration.provenance import build_provenance, provenance_line
from tmpdiff.calibration.session import check_steps
from tmpdiff.calibration.split_curve import bench_split_curve
from tmpdiff.eval.bootstrap import jackknife_interval, jackknife_values
from tmpdiff.eval.quality import frechet_distance
from tmpdiff.formats.atomic import write_bytes, write_json
from tmpdiff.formats.costs import load_costs
from tmpdiff.formats.errors import TmpdiffError

METRIC_NAMES = {"latent": "latent err", "one_minus_ssim": "1-SSIM (RGB)", "psnr": "PSNR dB", "correct": "adherence",
                "fd_vs_reference": "FD (8-d) vs fp32"}
HEADLINE = "TMPDiff refined (ssim)"


class PipelineJudge:
    """Per-sample judgements of schedules on an unseen prompts (or class labels) x seeds set, run in the session's
    pipeline and engines."""

    def __init__(self, session: PipelineSession, conditions: Sequence[str] | Sequence[int], seeds: Sequence[int]) -> None:
        ev: PipelineEvaluator = session.evaluator  # type: ignore[assignment]
        self.evaluator = PipelineEvaluator(ev.pipe, ev.denoiser, list(conditions), list(seeds), ev.steps,
                                           ev.guidance_scale, ev.reference, timesteps=ev.timesteps)
        self.attributes = attribute_judge(session.pipeline_dir, self.evaluator.labels)
        # samples are prompts x seeds: a prompt's samples under its seeds correlate, so intervals resample prompts
        # (all its seeds together); with a single prompt there is nothing but its seeds to resample
        labels = list(self.evaluator.labels)
        self.clusters = np.unique(np.asarray(labels), return_inverse=True)[1] if len(set(labels)) >= 2 else None
        self.fd_clusters = self.clusters if len(set(labels)) >= 3 else None  # the jackknife leaves out >= 3 of them
        self.reference_features = self.low = None
        if self.attributes is not None:
            from tmpdiff.eval.t2i import LowAttributes

            self.low = LowAttributes(self.attributes[0])  # FD between tens of images: in 8 dimensions
            self.reference_features = self._read(self.evaluator.reference_images)[1]
        self.cache: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
        self.fallbacks: dict[tuple[str, ...], int] = {}  # denoiser calls that fell back to a higher precision
        self.fd_cache: dict[tuple[str, ...], np.ndarray] = {}

    @property
    def samples(self) -> int:
        return len(self.evaluator.labels)

    def _read(self, images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        from tmpdiff.eval.attributes import read_attributes

        classifier, _ = self.attributes
        preds, feats = read_attributes(classifier, images * 2 - 1)
        return preds, self.low.project(feats.double().numpy())

    @torch.no_grad()
    def __call__(self, schedule: Sequence[str]) -> dict[str, np.ndarray]:
        key = tuple(schedule)
        if key not in self.cache:
            ev = self.evaluator
            reference = key == (ev.reference,) * ev.steps
            latents = ev.reference_latents if reference else ev.latents(key)
            self.fallbacks[key] = 0 if reference else ev.last_fallbacks
            judged, images = ev.sample_errors(latents)
            if self.attributes is not None:
                from tmpdiff.models.colored_digits import attributes

                preds, feats = self._read(images)
                right = (preds == attributes(self.attributes[1])).all(dim=1)
                judged |= {"correct": right.double().numpy(), "features": feats}
            self.cache[key] = judged
        return self.cache[key]

    def _fd(self, features: np.ndarray, rows: np.ndarray) -> float:
        # the fp32 images are of the same prompts and seeds: a resample keeps the same rows of both
        return frechet_distance(features[rows], self.reference_features[rows])

    def _fd_values(self, schedule: Sequence[str]) -> np.ndarray:
        """The FD to the fp32 images over all samples, then leaving each prompt out (all its seeds; each sample when
        there are fewer than 3 prompts), computed once per schedule."""
        key = tuple(schedule)
        if key not in self.fd_cache:
            features = self(schedule)["features"]
            self.fd_cache[key] = jackknife_values(lambda rows: self._fd(features, rows), self.samples, self.fd_clusters)
        return self.fd_cache[key]

    def summary(self, schedule: Sequence[str]) -> dict:
        """Mean [95% interval] of every metric; the FD to the fp32 images with a paired jackknife interval."""
        judged = self(schedule)
        out = summarise({k: v for k, v in judged.items() if k != "features"}, None, clusters=self.clusters)
        if "features" in judged:
            out["fd_vs_reference"] = jackknife_interval(self._fd_values(schedule), positive=True).as_dict()
        return out

    def versus(self, a: Sequence[str], b: Sequence[str]) -> dict:
        """a - b per metric over the same unseen samples (paired), with intervals."""
        ja, jb = self(a), self(b)
        out = compare({k: v for k, v in ja.items() if k != "features"}, {k: v for k, v in jb.items() if k != "features"},
                      None, clusters=self.clusters)
        if "features" in ja:
            d = jackknife_interval(self._fd_values(a) - self._fd_values(b))
            out["fd_vs_reference"] = {"diff": d.as_dict(), "significant": d.excludes(0.0), "better": d.value < 0}
        return out


def pipeline_bench(build_dir: Path, costs_path: Path, out: Path, pipeline_dir: Path,
                   prompts: Sequence[str] | Sequence[int], seeds: Sequence[int],
                   unseen_prompts: Sequence[str] | Sequence[int], unseen_seeds: Sequence[int],
                   steps_list: Sequence[int], speedups: Sequence[float], *, guidance: float | None = None,
                   reference: str = "fp32", threads: int | None = None, refine_evaluations: int | None = None,
                   timing_repeats: int = 3, on_progress: Callable[[str], None] = lambda _: None,
                   exhaustive: bool = True, exhaustive_at: Sequence[str] | None = None) -> dict:
    """Run the comparison at every step count and write bench.json, bench.md and pareto.png under `out`; with
    `exhaustive`, also every schedule over `exhaustive_at` levels (default: the reference and the cheapest) where
    they are few enough (`pipeline_exhaustive`; its table saved beside them as exhaustive_T<steps>.npz) as the
    optimum to judge against. `prompts` / `unseen_prompts` are class labels (ints) for a pipeline that takes them."""
    labelled = all(isinstance(c, int) for c in [*prompts, *unseen_prompts])
    if set(seeds) & set(unseen_seeds) and set(prompts) & set(unseen_prompts):
        raise TmpdiffError(f"the unseen set shares {'class labels' if labelled else 'prompts'} and seeds with the "
                           f"calibration set: give other --unseen-seeds or "
                           f"{'--unseen-classes' if labelled else '--unseen-prompts'}")
    if len(prompts) * len(seeds) < 2 or len(unseen_prompts) * len(unseen_seeds) < 3:
        raise TmpdiffError("a bench needs at least 2 samples in the calibration set and 3 in the unseen set (intervals; "
                           "a Fréchet distance's jackknife leaves one out)")
    for steps in steps_list:  # every step count before the first one's work (`out` appears with the first write)
        check_steps(steps)
    report: dict = {"kind": "pipeline", "pipeline": str(pipeline_dir), "costs": str(costs_path),
                    "costs_table": load_costs(costs_path).provenance(), "prompts": len(prompts), "seeds": list(seeds),
                    "unseen_prompts": len(unseen_prompts), "unseen_seeds": list(unseen_seeds),
                    "shared_prompts": len(set(prompts) & set(unseen_prompts)), "guidance_scale": guidance, "runs": [],
                    # "prompts" / "unseen_prompts" count class labels where the pipeline takes those
                    "conditioning": "class labels" if labelled else "prompts"}
    if labelled:
        report |= {"class_labels": list(prompts), "unseen_class_labels": list(unseen_prompts)}
    for steps in steps_list:
        on_progress(f"T={steps}: reference runs")
        session = open_pipeline_session(build_dir, costs_path, pipeline_dir, prompts, seeds, steps, "latent", reference,
                                        guidance, threads=threads)
        if "build_provenance" not in report:  # once: every step count judges the same engines
            report["build_provenance"] = build_provenance(build_dir, session.manifest, session.problem.all_levels)
        try:
            report["runs"].append(_bench_steps(session, unseen_prompts, unseen_seeds, speedups, refine_evaluations,
                                               timing_repeats, on_progress,
                                               out / f"exhaustive_T{steps}.npz" if exhaustive else None,
                                               exhaustive_at))
            memo = session.evaluator.memo  # type: ignore[attr-defined]
            if memo is not None:
                report["runs"][-1]["calibration_engine_calls"] = memo.counts()
                on_progress(f"T={steps}: calibration engine calls {memo.summary()}")
        finally:
            session.evaluator.close()
        write_json(out / "bench.json", report)  # a long run keeps what it measured
    write_bytes(out / "bench.md", render_markdown(report).encode())
    plot_pipeline_pareto(report, out / "pareto.png")
    return report


def _bench_steps(session: PipelineSession, unseen_prompts: Sequence[str], unseen_seeds: Sequence[int],
                 speedups: Sequence[float], refine_evaluations: int | None, timing_repeats: int,
                 on_progress: Callable[[str], None], table_path: Path | None,
                 exhaustive_at: Sequence[str] | None) -> dict:
    problem = session.problem
    # checked before any search runs: a wrong level is refused in seconds, not after the comparison
    levels = None if table_path is None else exhaustive_levels(problem.all_levels, problem.reference, exhaustive_at,
                                                                problem.steps)
    judge = PipelineJudge(session, unseen_prompts, unseen_seeds)
    reachable = {f"{s:g}x": s for s in speedups if s <= problem.max_speedup()}
    searched = {}
    for metric in ("latent", "ssim"):
        on_progress(f"T={problem.steps}: searches on {metric}")
        searched[metric] = search_matched(session, reachable, metric, on_progress, refine_evaluations)

    def row(name: str, schedule: Sequence[str], evaluations: int | None) -> dict:
        e = session.problem.evaluate(schedule)
        unseen = judge.summary(schedule)
        return {"method": name, "schedule": list(schedule), "speedup": problem.speedup(schedule),
                "evaluations": evaluations, "calib": {"latent": e.latent_error, "one_minus_ssim": 1 - e.ssim,
                                                      "psnr": None if e.psnr == float("inf") else e.psnr},
                "unseen": unseen, "fallbacks": {"calib": e.fallbacks, "unseen": judge.fallbacks[tuple(schedule)]}}

    on_progress(f"T={problem.steps}: judging on {judge.samples} unseen samples")
    run: dict = {"steps": problem.steps, "levels": problem.all_levels, "cost": problem.cost,
                 "max_speedup": problem.max_speedup(), "unseen_samples": judge.samples,
                 "calib_samples": len(session.evaluator.labels),
                 "uniform": [row(f"uniform {p}", [p] * problem.steps, 0) for p in problem.all_levels], "targets": [],
                 "skipped_speedups": [s for s in speedups if s > problem.max_speedup()]}
    for i, (label, speedup) in enumerate(reachable.items()):
        rows = []
        for metric, result in searched.items():
            for method, found in result["targets"][i]["methods"].items():
                name = f"{method} ({metric})" if method.startswith(("TMPDiff", "evolutionary")) else method
                if any(r["method"] == name for r in rows):
                    continue  # heuristics do not depend on the metric
                rows.append(row(name.replace("TMPDiff knapsack", "TMPDiff"), found["schedule"], found["evaluations"]))
        for level in problem.all_levels:  # the paper's headline: the uniform level of the same cost, if any
            if abs(problem.speedup([level] * problem.steps) - speedup) < 1e-3:
                rows.append(row(f"uniform {level} (same cost)", [level] * problem.steps, 0))
        headline = next(r for r in rows if r["method"] == HEADLINE)
        versus = {r["method"]: judge.versus(headline["schedule"], r["schedule"]) for r in rows if r is not headline}
        ref = [problem.reference] * problem.steps
        ref_s, tmp_s = session.evaluator.time_sampling([ref, headline["schedule"]], timing_repeats)
        run["targets"].append({"label": label, "speedup": speedup, "rows": rows, "headline_versus": versus,
                               "measured_speedup": ref_s / tmp_s, "timing_repeats": timing_repeats})
    run["evaluations"] = session.evaluator.runs
    if levels is not None:
        run["exhaustive_unseen"] = _exhaustive(session, levels, unseen_prompts, unseen_seeds, speedups, on_progress,
                                               table_path)
    return run


def _exhaustive(session: PipelineSession, levels: list[str], unseen_prompts: Sequence[str], unseen_seeds: Sequence[int],
                speedups: Sequence[float], on_progress: Callable[[str], None], table_path: Path) -> dict:
    """Every schedule over `levels` through the pipeline on the calibration and the unseen samples (the table saved
    to `table_path`): TMPDiff's searches on the table's calibration samples against the optimum there and on the
    unseen ones, and the selection floor of the unseen samples (`lossy.selection_floor`)."""
    ev: PipelineEvaluator = session.evaluator  # type: ignore[assignment]
    problem = session.problem
    calls = len(ev.seeds) + len(unseen_seeds)
    on_progress(f"T={problem.steps}: exhaustive optimum over {', '.join(levels)} ({len(levels) ** problem.steps} "
                f"schedules x {calls} pipeline calls, shared prefixes' engine calls reused)")
    started = time.perf_counter()
    table = build_pipeline_table(session, [(ev.conditions, ev.seeds), (unseen_prompts, unseen_seeds)], levels)
    wall = time.perf_counter() - started
    save_table(table, table_path)
    n = len(ev.conditions)
    judged_at = reachable(levels, problem.cost, speedups)
    result = exhaustive_comparison(table, ev.seeds, unseen_seeds, problem.cost, problem.reference,
                                   speedups=judged_at, calib_classes=list(range(n)),
                                   unseen_classes=list(range(n, n + len(unseen_prompts))), sample_unit="prompts")
    result |= {"wall_seconds": round(wall, 1), "table": table_path.name,
               "walk_note": "a pipeline call per seed over its prompts; shared prefixes' engine calls reused"}
    return result | {"selection_floor": selection_floor(table, result, problem.cost),
                     "size_curve": bench_size_curve(table, result, problem.cost, problem.reference, judged_at),
                     "split_curve": bench_split_curve(table, result, problem.cost, problem.reference, judged_at)}


def _ci(summary: dict, key: str, scale: float = 1.0) -> str:
    if key not in summary:
        return ""
    d = summary[key]
    return f"{d['value'] * scale:.4g} [{d['low'] * scale:.3g}, {d['high'] * scale:.3g}]"


def render_markdown(report: dict) -> str:
    costs = report["costs_table"]
    labelled = report.get("conditioning") == "class labels"
    kind, one = ("class labels", "class label") if labelled else ("prompts", "prompt")
    grid = (f"Searches calibrate on {report['prompts']} {kind} x seeds {report['seeds']}; the *unseen* columns judge "
            f"every schedule on {report['unseen_prompts']} {kind} x seeds {report['unseen_seeds']} "
            f"({report['shared_prompts']} {kind} shared with calibration), each sample against the fp32 image of the "
            f"same {one} and seed: mean [95% bootstrap interval, resampling {kind}]")
    if labelled:
        grid += (f" (calibration labels {report['class_labels']}, unseen {report['unseen_class_labels']}). No "
                 "judge of the images beyond the fp32 ones ships for a class-label pipeline: no adherence or FD.")
    else:
        grid += ("; FD (8-d): Fréchet distance of the attribute classifier's features projected on ground-truth "
                 "renders' top 8 principal directions, with a jackknife interval leaving out one prompt at a time.")
    lines = [f"# tmpdiff bench ({'class-label' if labelled else 'text-to-image'} pipeline)", "",
             f"Pipeline `{report['pipeline']}`. Costs ({costs['origin']}): {costs['note']}. Speedups in the tables "
             "are the costs table's; the measured one is timed here on denoiser calls.", "", grid, ""]
    if "build_provenance" in report:  # reports written before it was recorded have none
        lines += [provenance_line(report["build_provenance"]), ""]
    header = ["method", "speedup (costs)", "calib 1-SSIM", "unseen latent err", "unseen 1-SSIM", "unseen PSNR",
              "unseen adherence %", "unseen FD (8-d) vs fp32", "evaluations", "schedule"]
    for run in report["runs"]:
        lines += [f"## T = {run['steps']}: levels {run['levels']}, max speedup {run['max_speedup']:.3f}, "
                  f"{run['calib_samples']} calibration / {run['unseen_samples']} unseen samples, "
                  f"{run['evaluations']} schedules run", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in run["uniform"]:
            lines.append(_row(row))
        for target in run["targets"]:
            lines.append(f"| **target {target['label']}** (measured for {HEADLINE}: "
                         f"{target['measured_speedup']:.3f}x) |" + " |" * (len(header) - 1))
            lines += [_row(r) for r in target["rows"]]
        lines.append("")
        lines += fallback_lines(run["uniform"] + [r for target in run["targets"] for r in target["rows"]])
        for target in run["targets"]:
            lines += [f"### {HEADLINE} minus each method at {target['label']} (unseen, paired; * = interval excludes 0)",
                      "", "| method | Δ 1-SSIM | Δ PSNR dB | Δ adherence points | Δ FD |", "|---|---|---|---|---|"]
            for method, diffs in target["headline_versus"].items():
                cells = [_diff(diffs, k, 100 if k == "correct" else 1)
                         for k in ("one_minus_ssim", "psnr", "correct", "fd_vs_reference")]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
            for method, diffs in target["headline_versus"].items():
                if method.endswith("(same cost)"):
                    changes = [f"{name} {_percent(diffs, key)}" for key, name in
                               (("latent", "latent error"), ("one_minus_ssim", "1-SSIM"), ("psnr", "PSNR"))
                               if key in diffs]
                    lines += [f"At matched cost, {HEADLINE} against {method.removesuffix(' (same cost)')}: "
                              + ", ".join(changes) + " (% of the uniform level's value, paired interval).", ""]
        if "exhaustive_unseen" in run:
            lines += _render_exhaustive("exhaustive", run["exhaustive_unseen"])
        if run["skipped_speedups"]:
            lines += [f"Targets above the costs table's max speedup, skipped: {run['skipped_speedups']}", ""]
    lines += ["![pareto](pareto.png)", ""]
    return "\n".join(lines)


def _percent(diffs: dict, key: str) -> str:
    d = diffs[key]
    if d.get("percent") is None:
        return "n/a"
    return f"{format_percent(d)}{'*' if d['significant'] else ''}"


def _diff(diffs: dict, key: str, scale: float) -> str:
    if key not in diffs:
        return ""
    d = diffs[key]["diff"]
    mark = "*" if diffs[key]["significant"] else ""
    return f"{d['value'] * scale:+.3g} [{d['low'] * scale:+.3g}, {d['high'] * scale:+.3g}]{mark}"


def _row(row: dict) -> str:
    u = row["unseen"]
    short = " ".join(p.replace("fp32", "F").replace("int8", "i8").replace("int4", "i4") for p in row["schedule"])
    return (f"| {row['method']} | {row['speedup']:.3f} | {row['calib']['one_minus_ssim']:.4g} | {_ci(u, 'latent')} | "
            f"{_ci(u, 'one_minus_ssim')} | {_ci(u, 'psnr')} | {_ci(u, 'correct', 100)} | {_ci(u, 'fd_vs_reference')} | "
            f"{'' if row['evaluations'] is None else row['evaluations']} | `{short}` |")


def plot_pipeline_pareto(report: dict, path: Path) -> None:
    """Unseen SSIM and adherence against the costs table's speedup, one column per step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tmpdiff.calibration.report import save_figure

    runs = report["runs"]
    panels = [("one_minus_ssim", "unseen SSIM (RGB) vs fp32", lambda v: 1 - v), ("correct", "unseen adherence %",
                                                                                 lambda v: 100 * v)]
    fig, axes = plt.subplots(len(panels), len(runs), figsize=(5.5 * len(runs), 7), squeeze=False)
    for column, run in enumerate(runs):
        rows = list(run["uniform"]) + [r for t in run["targets"] for r in t["rows"]]
        for (key, label, transform), ax in zip(panels, axes[:, column], strict=True):
            for method in sorted({r["method"] for r in rows}):
                chosen = [r for r in rows if r["method"] == method and key in r["unseen"]]
                if not chosen:
                    continue
                ax.scatter([r["speedup"] for r in chosen], [transform(r["unseen"][key]["value"]) for r in chosen],
                           label=method, s=22, marker="*" if method.startswith("TMPDiff") else "o")
            ax.set_title(f"T = {run['steps']}")
            ax.set_xlabel("speedup (costs table)")
            ax.set_ylabel(label)
        axes[0, column].legend(fontsize=6)
    fig.suptitle(f"costs {report['costs_table']['note']}", fontsize=8)
    save_figure(fig, path)
