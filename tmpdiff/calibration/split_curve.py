"""Calibration set size against the unseen ratio, over random halvings of every sample an exhaustive table holds.

`lossy.size_curve` draws calibration subsets from a fixed pool and judges them on a fixed unseen set, so its largest
size is the pool, and one unseen set decides every figure. Here all the table's samples (calibration, unseen and
curve pool together) are split at random into two halves, `splits` times: calibration sets of each size are nested
prefixes of one half, the other half is the unseen set, and the figure is the ratio of the chosen schedule's unseen
mean to the unseen half's own exhaustive optimum. Beside refined TMPDiff it reports the calibration set's exhaustive
optimum (no search error, only the samples it was chosen on), so the two columns split a miss of the unseen goal into
the search's share and the samples' share. Table lookups only: no engine runs.

Where samples are prompts x seeds (`sample_unit` "prompts"), the halvings split prompts: all seeds of a prompt go to
one half, as the calibration and unseen prompts of a search are disjoint (splitting samples would calibrate on a
prompt under one seed and judge it under the other). Sizes are still counted in samples, in whole prompts: a
calibration set of n samples is the first n / seeds prompts of its half, with all their seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tmpdiff.calibration.exhaustive import SampleTable, optimum
from tmpdiff.calibration.lossy import TABLE_METRIC, budgets_for, cluster_order, halving_sizes, sample_clusters, search_on_table
from tmpdiff.formats.errors import TmpdiffError

GOAL = 1.15  # issue 15: within 15% of the unseen optimum at every budget


def split_size_curve(table: SampleTable, samples: np.ndarray, cost: dict[str, float], reference: str,
                     sizes: Sequence[int], splits: int = 10, metrics: Sequence[str] = ("latent", "ssim"),
                     speedups: Sequence[float] | None = None, seed: int = 0, sample_unit: str | None = None) -> dict:
    """Per metric and calibration set size, over `splits` random halvings of `samples`: refined TMPDiff's and the
    calibration optimum's unseen ratio per split and budget, with the evaluations the search spent. `sample_unit`
    "prompts": halvings split prompts (module docstring)."""
    samples = np.unique(np.asarray(samples))
    halvings = random_halvings(samples, sizes, splits, seed, sample_clusters(table, samples, sample_unit))
    budgets = budgets_for(table, cost, reference, speedups)
    out: dict = {"samples": int(len(samples)), "unseen_samples": int(len(halvings[0][1])) if halvings else 0,
                 "splits": splits, "sizes": sorted(sizes), "budgets": [label for label, _ in budgets], "goal": GOAL,
                 "split_unit": "prompts" if sample_unit == "prompts" else "samples", "metrics": {}}
    for metric in metrics:
        name = TABLE_METRIC[metric]
        refined = np.zeros((len(out["sizes"]), splits, len(budgets)))
        best = np.zeros_like(refined)
        evaluations = np.zeros_like(refined)
        for j, (order, unseen) in enumerate(halvings):
            for b, (_, budget) in enumerate(budgets):
                unseen_best = optimum(table, name, unseen, cost, budget)[1]
                for i, size in enumerate(out["sizes"]):
                    calib = np.sort(order[:size])
                    found = search_on_table(table, calib, cost, reference, metric, budget)
                    refined[i, j, b] = float(table.values(name, found["refined"], unseen).mean()) / unseen_best
                    chosen = optimum(table, name, calib, cost, budget)[0]
                    best[i, j, b] = float(table.values(name, chosen, unseen).mean()) / unseen_best
                    evaluations[i, j, b] = found["refined_evaluations"]
        out["metrics"][metric] = {
            "points": [{"samples": size, **_summary("refined", refined[i]), **_summary("calib_optimum", best[i]),
                        "max_evaluations": int(evaluations[i].max())} for i, size in enumerate(out["sizes"])],
            "refined": refined.tolist(), "calib_optimum": best.tolist()}  # sizes x splits x budgets
    return out


def random_halvings(samples: np.ndarray, sizes: Sequence[int], splits: int, seed: int,
                    clusters: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """`splits` random halvings of the (unique) samples: (one half in random order, whose prefixes are calibration
    sets of each size; the other half, unseen, sorted). With `clusters` (one id per sample: its prompt) whole
    clusters go to a half, in random order, the same number of clusters to each (one left out when their count is
    odd); they must be of one size (prompts x the same seeds), and calibration sizes whole clusters of samples."""
    samples = np.asarray(samples)
    unit = 1
    if clusters is not None:
        sizes_of = np.unique(np.unique(np.asarray(clusters), return_counts=True)[1])
        if len(sizes_of) != 1:
            raise TmpdiffError(f"halvings by prompt need every prompt with as many samples (seeds), got {sizes_of}")
        unit = int(sizes_of[0])
    half = len(samples) // unit // 2 * unit
    if not sizes or min(sizes) < 1 or max(sizes) > half:
        raise TmpdiffError(f"calibration set sizes must lie in 1..{half} (half of {len(samples)} samples), got {sizes}")
    if any(size % unit for size in sizes):
        raise TmpdiffError(f"calibration set sizes are samples in whole prompts ({unit} seeds each) when halvings "
                           f"split prompts, got {sizes}")
    rng = np.random.default_rng(seed)
    halvings = []
    for _ in range(splits):
        order = cluster_order(rng, samples, clusters)[0]
        halvings.append((order[:half], np.sort(order[half: 2 * half])))
    return halvings


def _summary(prefix: str, ratios: np.ndarray) -> dict:
    """splits x budgets ratios -> mean, mean of the worst budget, and how often the goal holds."""
    worst = ratios.max(axis=1)
    return {f"{prefix}_mean": float(ratios.mean()), f"{prefix}_mean_worst_budget": float(worst.mean()),
            f"{prefix}_worst": float(worst.max()),
            f"{prefix}_budgets_within_goal": float((ratios <= GOAL).mean()),  # share of (split, budget) pairs
            f"{prefix}_splits_within_goal": float((worst <= GOAL).mean())}  # share of splits: every budget within


def table_samples(table: SampleTable, spec: dict) -> np.ndarray:
    """Every sample a report part's config (or an `lossy.exhaustive_comparison` result) names: its calibration, unseen
    and size-curve pool samples."""
    parts = [table.samples_of(spec["calib_seeds"], spec.get("calib_classes")),
             table.samples_of(spec["unseen_seeds"], spec.get("unseen_classes"))]
    if spec.get("curve"):
        parts.append(table.samples_of(spec["curve"]["pool_seeds"], spec.get("calib_classes")))
    return np.unique(np.concatenate(parts))


def bench_split_curve(table: SampleTable, comparison: dict, cost: dict[str, float], reference: str,
                      speedups: Sequence[float] | None, splits: int = 20) -> dict | None:
    """The curve `tmpdiff bench` reports beside an exhaustive comparison: every calibration and unseen sample of
    `comparison` (an `lossy.exhaustive_comparison` result) halved `splits` times, calibration sets of halvings of a
    half. None when there are fewer than two samples. A pipeline's samples (`sample_unit` "prompts") are halved by
    prompt when every prompt has as many seeds; where calibration and unseen prompts have different numbers of seeds
    no halving by prompt gives equal halves, and the samples are halved (the result's `split_unit` says which)."""
    samples = table_samples(table, comparison)
    unit, sample_unit = 1, comparison.get("sample_unit")
    if sample_unit == "prompts":  # halvings split prompts: sizes in whole prompts
        counts = np.unique(np.unique(np.asarray(table.labels)[samples], return_counts=True)[1])
        if len(counts) == 1 and len(np.unique(np.asarray(table.labels)[samples])) >= 2:
            unit = int(counts[0])
        else:  # prompts under different numbers of seeds (calibration and unseen seeds unlike): halve samples
            sample_unit = None
    half = len(samples) // unit // 2  # in units (prompts, or samples)
    if half < 1:
        return None
    sizes = [unit * n for n in halving_sizes(half, smallest=min(-(-4 // unit), half))]
    return split_size_curve(table, samples, cost, reference, sizes, splits, speedups=speedups, sample_unit=sample_unit)


def render_split_curve(c: dict) -> list[str]:
    """Markdown section: per metric and calibration set size, refined TMPDiff beside the calibration optimum."""
    by_prompt = c.get("split_unit") == "prompts"
    lines = [f"### Calibration set size vs unseen ratio over {c['splits']} random halvings of all {c['samples']} samples"
             + (" (halved by prompt)" if by_prompt else ""),
             "", ("Halvings split prompts: all seeds of a prompt in one half; calibration sizes are samples, in whole "
                  "prompts. " if by_prompt else "")
             + "Each halving: calibration sets of every size are nested prefixes of one half, the other half "
             f"({c['unseen_samples']} samples) is unseen and its own exhaustive optimum is the reference. *calib-opt*: "
             "the calibration set's exhaustive optimum (no search error). Within goal: ratio <= "
             f"{c['goal']:.2f}, per (halving, budget) and at every budget of a halving ({len(c['budgets'])} budgets).",
             "", "| metric | calibration samples | refined: mean ratio | refined: mean of worst budget | refined: "
             "(halving, budget) within goal | refined: halvings within goal at every budget | calib-opt: mean ratio | "
             "calib-opt: mean of worst budget | calib-opt: halvings within goal at every budget | most evaluations |",
             "|" + "---|" * 10]
    for metric, d in c["metrics"].items():
        for p in d["points"]:
            lines.append(f"| {metric} | {p['samples']} | {p['refined_mean']:.3f} | {p['refined_mean_worst_budget']:.3f} "
                         f"| {100 * p['refined_budgets_within_goal']:.0f}% | {100 * p['refined_splits_within_goal']:.0f}% "
                         f"| {p['calib_optimum_mean']:.3f} | {p['calib_optimum_mean_worst_budget']:.3f} | "
                         f"{100 * p['calib_optimum_splits_within_goal']:.0f}% | {p['max_evaluations']} |")
    return lines + [""]


def plot_split_curve(ax, c: dict, title: str) -> None:
    """Mean of the worst budget against calibration set size: refined TMPDiff and the calibration optimum."""
    for metric, d in c["metrics"].items():
        xs = [p["samples"] for p in d["points"]]
        ax.plot(xs, [p["refined_mean_worst_budget"] for p in d["points"]], "o-", label=f"refined, {metric}")
        ax.plot(xs, [p["calib_optimum_mean_worst_budget"] for p in d["points"]], "s:", label=f"calib-opt, {metric}")
    ax.axhline(c["goal"], color="grey", lw=0.8, ls="--")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("calibration samples")
    ax.set_ylabel("worst budget's unseen ratio (mean of halvings)", fontsize=7)
    ax.legend(fontsize=6)
