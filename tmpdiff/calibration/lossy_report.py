"""bench_lossy.json, bench_lossy.md and lossy.png from the exhaustive tables, the size curves and the T = 20 run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tmpdiff.calibration.exhaustive import load_table, merge_tables
from tmpdiff.calibration.lossy import exhaustive_comparison, selection_floor, size_curve
from tmpdiff.calibration.matched import format_percent
from tmpdiff.calibration.split_curve import GOAL, plot_split_curve, render_split_curve, split_size_curve, table_samples
from tmpdiff.formats.atomic import write_bytes, write_json
from tmpdiff.formats.costs import load_costs

FORMAT = "tmpdiff.bench_lossy/1"
SHORT = {"fp32": "F", "fp16": "H", "int8": "8", "fp8": "f", "int4": "4"}
METRIC_NAMES = {"latent": "latent err", "one_minus_ssim": "1-SSIM", "psnr": "PSNR dB", "correct": "accuracy",
                "log_prob": "log p(class)", "fd_low": "FD (8-d)"}


def _short(schedule) -> str:
    return "".join(SHORT.get(p, "?") for p in schedule)


def _ci(d: dict, fmt: str = ".4g") -> str:
    return f"{d['value']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


def build_report(config: dict, on_progress=lambda _: None) -> dict:
    """Everything in one dict: costs provenance, parts (a) and (b), the size curve, part (c) and its headline."""
    costs = load_costs(Path(config["costs"]))
    cost = costs.step_costs()
    report: dict = {"format": FORMAT, "costs_table": costs.provenance(), "per_step_cost": cost,
                    "reference": config.get("reference", "fp32"), "parts": {}}
    for part, spec in config.get("exhaustive", {}).items():
        table = merge_tables([load_table(p) for p in spec["tables"]])
        result = exhaustive_comparison(table, spec["calib_seeds"], spec["unseen_seeds"], cost, report["reference"],
                                       speedups=spec.get("speedups"), on_progress=on_progress,
                                       calib_classes=spec.get("calib_classes"), unseen_classes=spec.get("unseen_classes"),
                                       sample_unit=spec.get("sample_unit"))
        result["wall_seconds"] = spec.get("wall_seconds")
        # a pipeline's table: samples are prompts x seeds, walked a pipeline call at a time
        result |= {key: spec[key] for key in ("sample_unit", "walk_note") if key in spec}
        if spec.get("curve"):
            c = spec["curve"]
            result["size_curve"] = size_curve(table, c["pool_seeds"], spec["unseen_seeds"], cost, report["reference"],
                                              c["sizes"], c.get("draws", 5), speedups=spec.get("speedups"),
                                              pool_classes=spec.get("calib_classes"),
                                              unseen_classes=spec.get("unseen_classes"))
        if spec.get("split_curve"):
            c = spec["split_curve"]
            result["split_curve"] = split_size_curve(table, table_samples(table, spec), cost, report["reference"],
                                                     c["sizes"], c.get("splits", 10), speedups=spec.get("speedups"),
                                                     sample_unit=spec.get("sample_unit"))
        if spec.get("floor"):
            result["selection_floor"] = selection_floor(table, result, cost, splits=spec["floor"].get("splits", 20))
        report["parts"][part] = result
    if config.get("matched"):
        report["parts"]["matched"] = matched_part(Path(config["matched"]), Path(config["matched_samples"]))
    return report


def matched_part(found_path: Path, samples_path: Path) -> dict:
    """Part (c): every method's unseen metrics with intervals; the headline vs the uniform level of matched cost."""
    import json

    from tmpdiff.calibration.matched import compare, summarise
    from tmpdiff.eval.quality import real_low_features
    from tmpdiff.models.bundled import bundled_dir

    found = json.loads(found_path.read_text())
    real = real_low_features(str(bundled_dir() / "classifier"))
    judged: dict[str, dict[str, np.ndarray]] = {}
    with np.load(samples_path) as data:
        for key in data.files:
            schedule, metric = key.split("|")
            judged.setdefault(schedule, {})[metric] = data[key]
    steps = found["steps"]
    uniform = {p: " ".join([p] * steps) for p in found["per_step_cost"]}
    found["uniform"] = {p: summarise(judged[s], real) for p, s in uniform.items() if s in judged}
    for target in found["targets"]:
        for method in target["methods"].values():
            method["unseen"] = summarise(judged[" ".join(method["schedule"])], real)
        level = next((p for p in uniform if target["label"] == f"uniform {p} cost"), None)
        if level is not None:
            tmp = judged[" ".join(target["methods"]["TMPDiff refined"]["schedule"])]
            target["headline"] = {"versus": f"uniform {level}", "metrics": compare(tmp, judged[uniform[level]], real)}
    return found


def render(report: dict) -> str:
    costs = report["costs_table"]
    lines = ["# tmpdiff bench: the lossy regime (issue 15)", "",
             f"Costs ({costs['origin']}): {costs['note']}. Per-step cost {report['per_step_cost']}. Speedups below are "
             "this table's, not timed here.", "",
             "Every search runs on the calibration seeds; every figure marked *unseen* is on seeds the search never "
             "saw, with a 95% bootstrap interval over samples (2,000 resamples, paired where two schedules are "
             "compared). Ratios are to the exhaustive optimum on the same samples at the same budget.", ""]
    for part, result in report["parts"].items():
        if part == "matched":
            lines += _render_matched(result)
        else:
            lines += _render_exhaustive(part, result)
    lines += ["![lossy](lossy.png)", ""]
    return "\n".join(lines)


def _subset(r: dict, which: str) -> str:
    """The classes (or, for a pipeline's table, the prompts) a comparison's sample set is restricted to."""
    chosen = r.get(f"{which}_classes")
    if not chosen:
        return ""
    if r.get("sample_unit") == "prompts":  # indices of prompts across the table's groups
        return f" x {len(chosen)} prompts"
    return f" classes {chosen}"


def fallback_lines(rows: list[dict]) -> list[str]:
    """A bench's methods whose schedule fell back to a higher precision (NaN/Inf output) at some step, on the
    calibration or the unseen samples: their quality there is partly the higher precision's, at the schedule's
    cost. Nothing when none did."""
    fell = [f"{r['method']} (`{_short(r['schedule'])}`: calibration {r['fallbacks']['calib']}, "
            f"unseen {r['fallbacks'].get('unseen', 'not judged')})"
            for r in rows if r.get("fallbacks") and any(r["fallbacks"].values())]
    if not fell:
        return []
    return ["Fell back to a higher precision at some step (NaN/Inf output; steps that fell back, summed over the "
            "runs): " + "; ".join(fell) + ". Their figures are partly the higher precision's.", ""]


def _fell_back_note(r: dict) -> str:
    """Schedules whose walk fell back to a higher precision (NaN/Inf): not options, and the methods that chose one."""
    count = r.get("fell_back_schedules")
    if not count:
        return ""
    chose = sorted({f"{method} ({row['metric']} {row['budget_label']})" for row in r["rows"]
                    for method, m in row["methods"].items() if m.get("fell_back")})
    return (f" {count:,} schedules fell back to a higher precision (NaN/Inf output) on some sample: they are no "
            "option at any budget (their scores are the higher precision's), and the searches count them as "
            "infinite error" + (f"; chosen anyway by {', '.join(chose)}" if chose else "") + ".")


def _render_exhaustive(part: str, r: dict) -> list[str]:
    lines = [f"## ({part}) T = {r['steps']}, levels {', '.join(r['levels'])}: all {r['schedules']:,} schedules", "",
             f"Calibration: seeds {r['calib_seeds']}{_subset(r, 'calib')} ({r['calib_samples']} samples); unseen: "
             f"seeds {r['unseen_seeds']}{_subset(r, 'unseen')} ({r['unseen_samples']} samples)."
             f" Prefix-cached tree walks: {r['step_evaluations']:,} step evaluations ("
             + r.get("walk_note", "batches of 10 classes x each walk's seeds") + ")"
             + (f", {r['wall_seconds'] / 60:.1f} min wall" if r.get("wall_seconds") else "") + "."
             + _fell_back_note(r),
             "", "| metric | budget | speedup | knapsack / opt (calib) | refined / opt (calib) | evaluations | "
             "refined / opt (unseen) [95% CI] | calib-optimum / opt (unseen) | evolutionary / opt (calib, unseen) | "
             "best heuristic / opt (calib) | refined schedule |", "|" + "---|" * 11]
    summary: dict[str, list] = {}
    for row in r["rows"]:
        m = row["methods"]
        heur = min(m[k]["calib_ratio"] for k in ("cheap first", "cheap last", "interleaved"))
        ref = m["TMPDiff refined"]
        lines.append(
            f"| {row['metric']} | {row['budget_label']} | {row['speedup']:.3f} | {m['TMPDiff knapsack']['calib_ratio']:.3f} | "
            f"{ref['calib_ratio']:.3f} | {ref['evaluations']} | {_ci(ref['unseen']['ratio_to_optimum'], '.3f')} | "
            f"{m['calibration optimum']['unseen']['ratio_to_optimum']['value']:.3f} | "
            f"{m['evolutionary (same evaluations)']['calib_ratio']:.3f}, "
            f"{m['evolutionary (same evaluations)']['unseen']['ratio_to_optimum']['value']:.3f} | {heur:.3f} | "
            f"`{_short(ref['schedule'])}` |")
        s = summary.setdefault(row["metric"], [])
        s.append((m["TMPDiff knapsack"]["calib_ratio"], ref["calib_ratio"], ref["unseen"]["ratio_to_optimum"]["value"],
                  ref["evaluations"], heur, m["calibration optimum"]["unseen"]["ratio_to_optimum"]["value"]))
    resampled = ("prompts (all seeds of a prompt together)" if r.get("sample_unit") == "prompts" else "samples")
    lines += ["", f"Unseen intervals: 95% bootstrap over {resampled}, the unseen optimum re-selected on each resample "
              "(the value is the ratio to the optimum of the unseen samples).",
              "", "Schedules: F fp32, 8 int8, f fp8, 4 int4, first step (noisiest) first. Evaluations: distinct "
              "schedules the search evaluated on the calibration set (sensitivities included); the cap is 3·T·L = "
              f"{3 * r['steps'] * len(r['levels'])}.", "", "| metric | worst knapsack / opt (calib) | worst refined / opt "
              "(calib) | worst refined / opt (unseen) | worst calib-optimum / opt (unseen) | most evaluations | "
              "refined never worse than best heuristic (calib) |", "|---|---|---|---|---|---|---|"]
    for metric, s in summary.items():
        arr = np.array(s)
        lines.append(f"| {metric} | {arr[:, 0].max():.3f} | {arr[:, 1].max():.3f} | {arr[:, 2].max():.3f} | "
                     f"{arr[:, 5].max():.3f} | {int(arr[:, 3].max())} | {bool((arr[:, 1] <= arr[:, 4] + 1e-12).all())} |")
    lines.append("")
    if "size_curve" in r:
        c = r["size_curve"]
        pool = f" ({c['pool_samples']} samples)" if "pool_samples" in c else ""
        unseen = f" ({c['unseen_samples']} samples)" if "unseen_samples" in c else ""
        lines += [f"### Calibration set size vs unseen ratio ({c['metric']}, refined TMPDiff; {c['draws']} random "
                  f"subsets per size of the samples of pool seeds {c['pool_seeds']}{pool}; unseen seeds "
                  f"{c['unseen_seeds']}{unseen})",
                  "",
                  "| calibration samples | mean ratio over budgets | mean of worst budget | worst draw's worst budget | "
                  "knapsack only: mean of worst budget |", "|---|---|---|---|---|"]
        for p in c["points"]:
            lines.append(f"| {p['samples']} | {p['mean_ratio']:.3f} | {p['mean_max_ratio']:.3f} | "
                         f"{p['worst_max_ratio']:.3f} | {p['knapsack_mean_max_ratio']:.3f} |")
        lines.append("")
    if "selection_floor" in r:
        f = r["selection_floor"]
        unit = ("prompts into halves A and B, all seeds of a prompt in one half" if f.get("split_unit") == "prompts"
                else "samples into halves A and B")
        lines += [f"### What any choice made on {f['half_samples']} samples reaches ({f['splits']} random splits of the "
                  f"unseen {unit})", "",
                  "Per budget, the mean over splits of: the exhaustive optimum of half A judged on half B against B's own "
                  "optimum (the floor: no search error, only the samples it was chosen on), and refined TMPDiff "
                  f"(calibrated on seeds {f['calib_seeds']}) judged on the same B.", "",
                  "| metric | budget | floor: optimum of A / opt (B) | refined TMPDiff / opt (B) |", "|---|---|---|---|"]
        for row in f["rows"]:
            lines.append(f"| {row['metric']} | {row['budget_label']} | {np.mean(row['floor']):.3f} | "
                         f"{np.mean(row['refined']):.3f} |")
        lines += ["", "| metric | floor: mean over splits of the worst budget | refined: the same |", "|---|---|---|"]
        for metric, s in f["summary"].items():
            lines.append(f"| {metric} | {s['floor_mean_worst_budget']:.3f} | {s['refined_mean_worst_budget']:.3f} |")
        lines.append("")
    if r.get("split_curve"):
        lines += render_split_curve(r["split_curve"])
    return lines


def _fmt_metric(name: str, d: dict) -> str:
    if name == "correct":
        return f"{100 * d['value']:.1f}% [{100 * d['low']:.1f}, {100 * d['high']:.1f}]"
    return _ci(d, ".4g")


def _render_matched(r: dict) -> list[str]:
    names = ["latent", "one_minus_ssim", "psnr", "correct", "log_prob", "fd_low"]
    lines = [f"## (c) T = {r['steps']}, all levels, real evaluations", "",
             f"Calibration seeds {r['calib_seeds']} (metric {r['metric']}), unseen seeds {r['unseen_seeds']} "
             f"({10 * len(r['unseen_seeds'])} samples). Sensitivities: {r['sensitivity_evaluations']} evaluations; "
             f"cap 3·T·L = {r['cap']}" + (f"; refinement limited to {r['refine_evaluations']} evaluations per target"
             if r.get("refine_evaluations") else "") + ". The evolutionary search gets as many evaluations as refined "
             "TMPDiff used. FD (8-d): Fréchet distance of the classifier's features projected on the real digits' top 8 "
             "principal directions, to all 1,797 real digits, with a jackknife interval (the percentile bootstrap of a "
             "plug-in FD is shifted); accuracy and log p(class) are saturated here (every sample recognised, "
             "log p within 1e-5 of 0), so they cannot separate schedules.", "",
             "| target | method | evaluations | calib error | " + " | ".join(METRIC_NAMES[n] + " (unseen)" for n in names)
             + " | schedule |", "|" + "---|" * (5 + len(names))]
    for p, summary in r["uniform"].items():
        lines.append(f"| - | uniform {p} | 0 | | " + " | ".join(_fmt_metric(n, summary[n]) for n in names if n in summary)
                     + f" | `{_short([p] * r['steps'])}` |")
    for t in r["targets"]:
        for method, m in t["methods"].items():
            lines.append(f"| {t['label']} ({t['speedup']:.3f}x) | {method} | {m['evaluations']} | {m['calib_error']:.4g} | "
                         + " | ".join(_fmt_metric(n, m["unseen"][n]) for n in names if n in m["unseen"])
                         + f" | `{_short(m['schedule'])}` |")
    lines += ["", "### Headline at matched cost: refined TMPDiff vs the uniform level of the same cost (unseen seeds)", "",
              "| target | versus | metric | TMPDiff - uniform [95% CI] | % change [CI] | interval excludes 0 | TMPDiff better |",
              "|---|---|---|---|---|---|---|"]
    for t in r["targets"]:
        if "headline" not in t:
            continue
        for name, c in t["headline"]["metrics"].items():
            pct = "" if c["percent"] is None else format_percent(c)
            of = "" if c.get("percent_of", "mean") == "mean" else f" (% of {c['percent_of']})"
            lines.append(f"| {t['label']} | {t['headline']['versus']} | {METRIC_NAMES.get(name, name)}{of} | "
                         f"{_ci(c['diff'], '.3g')} | {pct} | {c['significant']} | {c['better']} |")
    lines.append("")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tmpdiff.calibration.report import save_figure

    parts = [(k, v) for k, v in report["parts"].items() if k != "matched"]
    curves = [(k, v["size_curve"]) for k, v in parts if "size_curve" in v]
    splits = [(k, v["split_curve"]) for k, v in parts if v.get("split_curve")]
    panels = len(parts) + len(curves) + len(splits)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), squeeze=False)
    for ax, (part, r) in zip(axes[0], parts, strict=False):
        rows = [row for row in r["rows"] if row["metric"] == "latent"]
        x = [row["speedup"] for row in rows]
        for method, style in (("TMPDiff knapsack", "o--"), ("TMPDiff refined", "o-"), ("calibration optimum", "s:"),
                              ("evolutionary (same evaluations)", "^-."), ("cheap last", "x:")):
            ax.plot(x, [row["methods"][method]["unseen"]["ratio_to_optimum"]["value"] for row in rows], style,
                    label=method, ms=4)
        lo = [row["methods"]["TMPDiff refined"]["unseen"]["ratio_to_optimum"]["low"] for row in rows]
        hi = [row["methods"]["TMPDiff refined"]["unseen"]["ratio_to_optimum"]["high"] for row in rows]
        ax.fill_between(x, lo, hi, alpha=0.2, label="refined 95% CI")
        ax.axhline(GOAL, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(f"({part}) T={r['steps']} {'/'.join(r['levels'])}: unseen latent error / unseen optimum", fontsize=8)
        ax.set_xlabel("speedup (stated costs)")
        ax.legend(fontsize=6)
    for ax, (part, c) in zip(axes[0][len(parts):], curves, strict=False):
        xs = [p["samples"] for p in c["points"]]
        ax.plot(xs, [p["mean_ratio"] for p in c["points"]], "o-", label="mean over budgets")
        ax.plot(xs, [p["mean_max_ratio"] for p in c["points"]], "s-", label="worst budget (mean of draws)")
        ax.plot(xs, [p["knapsack_mean_max_ratio"] for p in c["points"]], "x--", label="knapsack only, worst budget")
        ax.axhline(GOAL, color="grey", lw=0.8, ls="--")
        ax.set_title(f"({part}) calibration set size vs unseen ratio to optimum", fontsize=8)
        ax.set_xlabel("calibration samples")
        ax.legend(fontsize=6)
    for ax, (part, c) in zip(axes[0][len(parts) + len(curves):], splits, strict=False):
        plot_split_curve(ax, c, f"({part}) calibration set size over {c['splits']} halvings of {c['samples']} samples")
    fig.suptitle(f"costs {report['costs_table']['note']}", fontsize=7)
    save_figure(fig, path)


def write_report(out: Path, config: dict, on_progress=lambda _: None) -> dict:
    report = build_report(config, on_progress)
    report["config"] = config
    write_json(out / "bench_lossy.json", report)
    write_bytes(out / "bench_lossy.md", render(report).encode())
    plot(report, out / "lossy.png")
    return report
