"""Does another rule for choosing a schedule on the calibration samples generalise better than their mean?

Every search here, and the exhaustive "calibration optimum", picks the schedule of least *mean* error over the
calibration samples. On the committed tables that choice misses the unseen optimum by 15-100% at its worst budget,
and more calibration samples barely help (`split_curve`). Per-sample errors are heavy-tailed (a few samples carry
most of a mean), so a rule that weighs samples more evenly could rank schedules with less noise even though the
unseen figure stays the mean. This module measures that on an exhaustive table: over the same random halvings as
`split_curve` (calibration sets are prefixes of one half, the other half is unseen), each rule picks the best
in-budget schedule on the calibration set by its own statistic, and the pick is judged by its *mean* on the unseen
half against that half's own optimum. The rule "mean" is the calibration optimum of `split_curve`. Table lookups only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tmpdiff.calibration.exhaustive import SampleTable, feasible_rows
from tmpdiff.calibration.lossy import TABLE_METRIC, budgets_for, sample_clusters
from tmpdiff.calibration.split_curve import GOAL, random_halvings

_TINY = 1e-12  # keeps a zero error (the reference's own schedule) finite under a logarithm


def _trimmed_mean(errors: np.ndarray, share: float = 0.1) -> np.ndarray:
    cut = int(share * errors.shape[1])
    return np.sort(errors, axis=1)[:, cut: errors.shape[1] - cut].mean(axis=1)


def _pessimistic(errors: np.ndarray) -> np.ndarray:
    n = errors.shape[1]
    spread = errors.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(len(errors))
    return errors.mean(axis=1) + 0.5 * spread


# rule -> statistic per schedule (lower is better) of the (schedules, calibration samples) errors
RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda e: e.mean(axis=1),
    "median": lambda e: np.median(e, axis=1),
    "trimmed mean (10%)": _trimmed_mean,
    "geometric mean": lambda e: np.log(e + _TINY).mean(axis=1),
    "per-sample normalised mean": lambda e: (e / np.maximum(e.mean(axis=0, keepdims=True), _TINY)).mean(axis=1),
    "mean + 0.5 standard error": _pessimistic,
}


def selection_rules_curve(table: SampleTable, samples: np.ndarray, cost: dict[str, float], reference: str,
                          sizes: Sequence[int], splits: int = 20, metrics: Sequence[str] = ("latent", "ssim"),
                          speedups: Sequence[float] | None = None, seed: int = 0, sample_unit: str | None = None
                          ) -> dict:
    """Per metric, rule and calibration set size: the unseen ratio of each rule's pick per halving and budget, and
    its summary (mean, mean of the worst budget, halvings within `GOAL` at every budget). `sample_unit` "prompts":
    halvings split prompts and sizes are samples in whole prompts, as in `split_curve`."""
    samples = np.unique(np.asarray(samples))
    halvings = random_halvings(samples, sizes, splits, seed, sample_clusters(table, samples, sample_unit))
    budgets = budgets_for(table, cost, reference, speedups)
    feasible = [feasible_rows(table, cost, budget) for _, budget in budgets]
    out: dict = {"samples": int(len(samples)), "unseen_samples": int(len(halvings[0][1])) if halvings else 0,
                 "split_unit": "prompts" if sample_unit == "prompts" else "samples", "splits": splits,
                 "sizes": sorted(sizes),
                 "budgets": [label for label, _ in budgets], "goal": GOAL, "rules": list(RULES), "metrics": {}}
    for metric in metrics:
        errors = table.metrics[TABLE_METRIC[metric]].astype(np.float64)
        ratios = np.zeros((len(RULES), len(out["sizes"]), splits, len(budgets)))  # rules x sizes x splits x budgets
        for j, (order, unseen) in enumerate(halvings):
            unseen_means = errors[:, unseen].mean(axis=1)
            for i, size in enumerate(out["sizes"]):
                calib = errors[:, np.sort(order[:size])]
                for r, rule in enumerate(RULES.values()):
                    statistic = rule(calib)
                    for b, rows in enumerate(feasible):
                        pick = rows[np.argmin(statistic[rows])]
                        ratios[r, i, j, b] = unseen_means[pick] / unseen_means[rows].min()
        out["metrics"][metric] = {
            "points": [{"rule": name, "samples": size, **_summary(ratios[r, i])}
                       for r, name in enumerate(RULES) for i, size in enumerate(out["sizes"])],
            "ratios": ratios.tolist()}
    return out


def _summary(ratios: np.ndarray) -> dict:
    """splits x budgets -> the figures `split_curve` reports for its columns."""
    worst = ratios.max(axis=1)
    return {"mean": float(ratios.mean()), "mean_worst_budget": float(worst.mean()), "worst": float(worst.max()),
            "budgets_within_goal": float((ratios <= GOAL).mean()), "splits_within_goal": float((worst <= GOAL).mean())}


def render_selection_rules(name: str, c: dict) -> list[str]:
    """Markdown table of one table's curve: a row per metric, size and rule."""
    by = " by prompt (all seeds of a prompt in one half)" if c.get("split_unit") == "prompts" else ""
    lines = [f"### {name}: {c['samples']} samples, {c['splits']} random halvings{by}, {c['unseen_samples']} unseen, "
             f"budgets {', '.join(c['budgets'])}", "",
             "| metric | calibration samples | rule | mean ratio | mean of worst budget | (halving, budget) within "
             f"{c['goal']:.2f} | halvings within {c['goal']:.2f} at every budget |", "|" + "---|" * 7]
    for metric, d in c["metrics"].items():
        for p in sorted(d["points"], key=lambda p: (p["samples"], c["rules"].index(p["rule"]))):
            lines.append(f"| {metric} | {p['samples']} | {p['rule']} | {p['mean']:.3f} | {p['mean_worst_budget']:.3f} "
                         f"| {100 * p['budgets_within_goal']:.0f}% | {100 * p['splits_within_goal']:.0f}% |")
    return lines + [""]
