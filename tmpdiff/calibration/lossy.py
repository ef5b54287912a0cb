"""The lossy regime on exhaustive tables: TMPDiff (knapsack, then refined) against the optimum, judged on unseen seeds.

Every search runs on the calibration samples of a `SampleTable` (a lookup: the table holds every schedule's
per-sample scores), so its evaluations are counted as the distinct schedules it asked for, exactly as a real
calibration would spend them. Each chosen schedule is then judged on the table's unseen samples against the
optimum *on those samples* at the same budget, with paired bootstrap intervals.

Where samples are prompts x seeds (a text-to-image pipeline's table, `sample_unit` "prompts": a sample's label is
its prompt), the samples of one prompt are not independent (their errors under two seeds correlate): the intervals
resample prompts, all of a prompt's seeds together, and halvings (`selection_floor`, `split_curve`) split prompts,
so no prompt is on both sides. A class-conditional table's samples stay the unit: its classes are a fixed stratum
(the same 10 in every set, not a draw from a population of classes) and each sample's noise is its own seed's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tmpdiff.calibration.baselines import evolutionary, heuristics_at_budget
from tmpdiff.calibration.exhaustive import SampleTable, TableEvaluator, feasible_rows, optimum
from tmpdiff.calibration.refine import evaluation_cap, refine
from tmpdiff.calibration.search import Problem, measure_sensitivities, tmpdiff_search
from tmpdiff.eval.bootstrap import RESAMPLES, bootstrap_weights, mean_ci, min_mean_draws, ratio_to_best_ci
from tmpdiff.formats.errors import TmpdiffError

# search metric (Problem/Evaluation name) -> per-sample table metric
TABLE_METRIC = {"latent": "latent", "ssim": "one_minus_ssim"}


def sample_clusters(table: SampleTable, samples: np.ndarray, sample_unit: str | None) -> np.ndarray | None:
    """Per sample of `samples`, its cluster for intervals and halvings: its prompt (label) where samples are prompts x
    seeds (`sample_unit` "prompts"), else None (samples independent). A single prompt leaves only its seeds to
    resample or split: None too."""
    labels = np.asarray(table.labels)[np.asarray(samples)]
    return labels if sample_unit == "prompts" and len(np.unique(labels)) >= 2 else None


def cluster_order(rng: np.random.Generator, samples: np.ndarray, clusters: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A random order of `samples` and the cumulative sizes of its units: without clusters a permutation of the
    samples (units of one); with them, the clusters in random order, each cluster's samples together."""
    samples = np.asarray(samples)
    if clusters is None:
        return rng.permutation(samples), np.arange(1, len(samples) + 1)
    ids, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    groups = [samples[inverse.reshape(-1) == i] for i in rng.permutation(len(ids))]
    return np.concatenate(groups), np.cumsum([len(g) for g in groups])


def table_problem(table: SampleTable, samples: np.ndarray, cost: dict[str, float], reference: str, metric: str
                  ) -> tuple[Problem, TableEvaluator]:
    evaluator = TableEvaluator(table, samples)
    levels = {p: cost[p] for p in table.levels}
    return Problem.create(table.steps, reference, levels, metric, evaluator), evaluator


def budgets_for(table: SampleTable, cost: dict[str, float], reference: str, speedups: Sequence[float] | None
                ) -> list[tuple[str, float]]:
    """(label, budget): every count K of cheap steps for two levels, else the given speedups."""
    T = table.steps
    if len(table.levels) == 2 and speedups is None:
        cheap = next(p for p in table.levels if p != reference)
        return [(f"K={k}", (T - k) * cost[reference] + k * cost[cheap]) for k in range(1, T)]
    return [(f"{s:g}x", T * cost[reference] / s) for s in speedups or ()]


def reachable(levels: Sequence[str], cost: dict[str, float], speedups: Sequence[float]) -> list[float] | None:
    """The speedups an exhaustive comparison over `levels` (the reference first) is judged at: None for two levels
    (every count of cheap steps, `budgets_for`), else the targets the levels can reach."""
    if len(levels) == 2:
        return None
    return [s for s in speedups if s <= cost[levels[0]] / min(cost[p] for p in levels) + 1e-9]


def search_on_table(table: SampleTable, calib: np.ndarray, cost: dict[str, float], reference: str, metric: str,
                    budget: float, cap: int | None = None) -> dict:
    """Knapsack and knapsack + refinement on the calibration samples; schedules and evaluations of each."""
    problem, evaluator = table_problem(table, calib, cost, reference, metric)
    sens = measure_sensitivities(problem)
    sens_evals = len(evaluator.asked)
    knap, _ = tmpdiff_search(problem, budget, sens)
    knap_evals = len(evaluator.asked)
    limit = evaluation_cap(problem) if cap is None else cap
    refined = refine(problem, knap, budget, max(0, limit - knap_evals), sens)
    return {"sensitivity_evaluations": sens_evals, "knapsack": knap, "knapsack_evaluations": knap_evals,
            "refined": refined.schedule, "refined_evaluations": len(evaluator.asked), "problem": problem}


def _judge(table: SampleTable, metric: str, schedule, candidates: np.ndarray, samples: np.ndarray, seed: int,
           clusters: np.ndarray | None, best_draws: np.ndarray) -> dict:
    """Mean on samples with its interval, and the paired ratio to the optimum there with its interval.

    The value is the ratio to the optimum of these samples (least mean over `candidates`, the rows of the budget's
    schedules); the interval re-selects that optimum on every resample (`best_draws`: `_optimum_draws`), so it carries
    the selection's variability and never reaches below 1 for a schedule within the budget."""
    name = TABLE_METRIC[metric]
    values = table.values(name, schedule, samples)
    ratio = ratio_to_best_ci(values, candidates, seed=seed, clusters=clusters, best_draws=best_draws)
    return {"mean": mean_ci(values, seed=seed, clusters=clusters).as_dict(), "ratio_to_optimum": ratio.as_dict()}


def _optimum_draws(table: SampleTable, metric: str, cost: dict[str, float], budget: float, samples: np.ndarray,
                   seed: int, clusters: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The budget's schedules' values on `samples` (feasible rows x samples) and their least mean per resample (the
    optimum re-selected on each, `bootstrap.min_mean_draws`), for `_judge` of every method at that budget."""
    candidates = table.metrics[TABLE_METRIC[metric]][feasible_rows(table, cost, budget)][:, samples].astype(np.float64)
    weights = bootstrap_weights(len(samples), RESAMPLES, seed, clusters)
    return candidates, min_mean_draws(candidates, weights)


def exhaustive_comparison(table: SampleTable, calib_seeds: Sequence[int], unseen_seeds: Sequence[int],
                          cost: dict[str, float], reference: str, metrics: Sequence[str] = ("latent", "ssim"),
                          speedups: Sequence[float] | None = None, on_progress=lambda _: None,
                          calib_classes: Sequence[int] | None = None, unseen_classes: Sequence[int] | None = None,
                          sample_unit: str | None = None) -> dict:
    """Per calibration metric and budget: optimum (calibration and unseen), TMPDiff knapsack and refined,
    evolutionary at TMPDiff's evaluations, heuristics; ratios on calibration samples and on unseen ones.
    Unseen samples are other seeds, or (with `*_classes`) other classes of the same seeds. `sample_unit` "prompts":
    the labels are prompts and the unseen intervals resample prompts (module docstring)."""
    calib, unseen = table.samples_of(calib_seeds, calib_classes), table.samples_of(unseen_seeds, unseen_classes)
    _check_apart(calib, unseen)
    clusters = sample_clusters(table, unseen, sample_unit)
    out: dict = {"steps": table.steps, "levels": table.levels, "schedules": len(table.schedules),
                 "step_evaluations": table.step_evaluations, "calib_seeds": list(calib_seeds),
                 "unseen_seeds": list(unseen_seeds), "calib_classes": calib_classes, "unseen_classes": unseen_classes,
                 "calib_samples": int(len(calib)),
                 "unseen_samples": int(len(unseen)), "fell_back_schedules": int(table.fell_back().sum()), "rows": []}
    if sample_unit is not None:
        out["sample_unit"] = sample_unit
    fell_back = table.fell_back()
    for metric in metrics:
        name = TABLE_METRIC[metric]
        for label, budget in budgets_for(table, cost, reference, speedups):
            on_progress(f"T={table.steps} {metric} {label}")
            found = search_on_table(table, calib, cost, reference, metric, budget)
            problem = found["problem"]
            opt_c, opt_c_value = optimum(table, name, calib, cost, budget)
            opt_u, opt_u_value = optimum(table, name, unseen, cost, budget)
            candidates, best_draws = _optimum_draws(table, metric, cost, budget, unseen, len(out["rows"]), clusters)
            methods = {"TMPDiff knapsack": (found["knapsack"], found["knapsack_evaluations"]),
                       "TMPDiff refined": (found["refined"], found["refined_evaluations"]),
                       "calibration optimum": (opt_c, len(table.schedules))}
            evo_problem, evo_eval = table_problem(table, calib, cost, reference, metric)
            evo = evolutionary(evo_problem, budget, found["refined_evaluations"], seed=table.steps)
            methods["evolutionary (same evaluations)"] = (evo, len(evo_eval.asked))
            for kind, schedule in heuristics_at_budget(problem, problem.cheapest, budget).items():
                methods[kind] = (schedule, 0)
            row = {"metric": metric, "budget_label": label, "budget": budget,
                   "speedup": table.steps * cost[reference] / budget,
                   "optimum_calib": {"schedule": list(opt_c), "value": opt_c_value},
                   "optimum_unseen": {"schedule": list(opt_u), "value": opt_u_value}, "methods": {}}
            for method, (schedule, evals) in methods.items():
                calib_value = float(table.values(name, schedule, calib).mean())
                row["methods"][method] = {
                    "schedule": list(schedule), "evaluations": evals, "calib": calib_value,
                    "fell_back": bool(fell_back[table.row(schedule)]),
                    "calib_ratio": calib_value / opt_c_value if opt_c_value > 0 else float("nan"),
                    "unseen": _judge(table, metric, schedule, candidates, unseen, len(out["rows"]), clusters,
                                     best_draws)}
            out["rows"].append(row)
    return out


def _check_apart(calib: np.ndarray, unseen: np.ndarray) -> None:
    """Judging on unseen samples means none of them was calibrated on."""
    if set(calib.tolist()) & set(unseen.tolist()):
        raise TmpdiffError("calibration and unseen samples overlap")


def size_curve(table: SampleTable, pool_seeds: Sequence[int], unseen_seeds: Sequence[int], cost: dict[str, float],
               reference: str, sizes: Sequence[int], draws: int = 5, metric: str = "latent",
               speedups: Sequence[float] | None = None, seed: int = 0, pool_classes: Sequence[int] | None = None,
               unseen_classes: Sequence[int] | None = None) -> dict:
    """Calibration set size (samples) vs the refined schedule's unseen ratio to the unseen optimum: per size,
    `draws` random subsets of the pool's samples (its seeds, and with `pool_classes` only those classes); mean and
    max over budgets, averaged over draws."""
    rng = np.random.default_rng(seed)
    name = TABLE_METRIC[metric]
    pool, unseen = table.samples_of(pool_seeds, pool_classes), table.samples_of(unseen_seeds, unseen_classes)
    _check_apart(pool, unseen)
    budgets = budgets_for(table, cost, reference, speedups)
    optima = {label: optimum(table, name, unseen, cost, b) for label, b in budgets}
    points = []
    for size in sizes:
        runs = []
        for _ in range(draws if size < len(pool) else 1):
            calib = np.sort(rng.choice(pool, size=size, replace=False))
            ratios, knap_ratios, evals = [], [], []
            for label, budget in budgets:
                found = search_on_table(table, calib, cost, reference, metric, budget)
                opt_value = optima[label][1]
                for key, acc in (("refined", ratios), ("knapsack", knap_ratios)):
                    acc.append(float(table.values(name, found[key], unseen).mean()) / opt_value)
                evals.append(found["refined_evaluations"])
            runs.append({"samples": calib.tolist(), "ratios": ratios, "knapsack_ratios": knap_ratios,
                         "evaluations": evals})
        points.append({"samples": int(size), "runs": runs,
                       "mean_ratio": float(np.mean([np.mean(r["ratios"]) for r in runs])),
                       "mean_max_ratio": float(np.mean([np.max(r["ratios"]) for r in runs])),
                       "worst_max_ratio": float(np.max([np.max(r["ratios"]) for r in runs])),
                       "knapsack_mean_max_ratio": float(np.mean([np.max(r["knapsack_ratios"]) for r in runs]))})
    return {"metric": metric, "pool_seeds": list(pool_seeds), "unseen_seeds": list(unseen_seeds),
            "pool_samples": int(len(pool)), "unseen_samples": int(len(unseen)),
            "budgets": [label for label, _ in budgets], "draws": draws, "points": points}


def halving_sizes(samples: int, smallest: int = 4) -> list[int]:
    """Calibration set sizes for a curve over a pool of `samples`: the pool, its half, its quarter, ... (>= smallest)."""
    sizes = [samples]
    while sizes[-1] // 2 >= smallest:
        sizes.append(sizes[-1] // 2)
    return sorted(sizes)


def bench_size_curve(table: SampleTable, comparison: dict, cost: dict[str, float], reference: str,
                     speedups: Sequence[float] | None, draws: int = 6) -> dict:
    """The size curve `tmpdiff bench` reports beside an exhaustive comparison: subsets of its calibration samples
    (halvings of the set), each searched and judged on its unseen samples. Table lookups only: no engine runs."""
    return size_curve(table, comparison["calib_seeds"], comparison["unseen_seeds"], cost, reference,
                      halving_sizes(comparison["calib_samples"]), draws, speedups=speedups,
                      pool_classes=comparison.get("calib_classes"), unseen_classes=comparison.get("unseen_classes"))


def selection_floor(table: SampleTable, comparison: dict, cost: dict[str, float], splits: int = 20,
                    seed: int = 0) -> dict:
    """How close to the unseen optimum any choice made on finite samples can land: for random splits of the unseen
    samples of `comparison` (an `exhaustive_comparison` result) into halves A and B, the exhaustive optimum of A judged
    on B against B's own optimum (the floor: the best schedule of A's samples, chosen with no search error) beside the
    comparison's refined TMPDiff schedule (calibrated on its calibration seeds) judged on the same B. The optimum of B
    is picked on B, so both ratios carry the same selection bias; a search that matches the floor generalises as well
    as an exhaustive search on that many samples can. Where samples are prompts x seeds (the comparison's
    `sample_unit` "prompts") the halves split prompts, all seeds of a prompt in one half (A: half the prompts,
    rounded down), as the calibration and unseen sets of a search do; splitting samples would put a prompt in both
    halves under its two seeds and make the floor optimistic."""
    rng = np.random.default_rng(seed)
    unseen = table.samples_of(comparison["unseen_seeds"], comparison.get("unseen_classes"))
    clusters = sample_clusters(table, unseen, comparison.get("sample_unit"))
    halves = []
    for _ in range(splits):
        order, bounds = cluster_order(rng, unseen, clusters)
        cut = int(bounds[len(bounds) // 2 - 1]) if len(bounds) > 1 else len(order) // 2
        halves.append((np.sort(order[:cut]), np.sort(order[cut:])))
    out: dict = {"calib_seeds": comparison["calib_seeds"], "unseen_seeds": comparison["unseen_seeds"],
                 "splits": splits, "half_samples": int(len(halves[0][0]) if halves else len(unseen) // 2),
                 "split_unit": "prompts" if clusters is not None else "samples", "rows": []}
    for row in comparison["rows"]:
        name, budget = TABLE_METRIC[row["metric"]], row["budget"]
        refined = row["methods"]["TMPDiff refined"]["schedule"]
        floor, ours = [], []
        for a, b in halves:
            best_b = optimum(table, name, b, cost, budget)[1]
            floor.append(float(table.values(name, optimum(table, name, a, cost, budget)[0], b).mean()) / best_b)
            ours.append(float(table.values(name, refined, b).mean()) / best_b)
        out["rows"].append({"metric": row["metric"], "budget_label": row["budget_label"], "floor": floor,
                            "refined": ours})
    out["summary"] = {}
    for metric in dict.fromkeys(r["metric"] for r in out["rows"]):
        rows = [r for r in out["rows"] if r["metric"] == metric]
        floor, ours = np.array([r["floor"] for r in rows]), np.array([r["refined"] for r in rows])  # budgets x splits
        out["summary"][metric] = {"floor_mean_worst_budget": float(floor.max(axis=0).mean()),
                                  "refined_mean_worst_budget": float(ours.max(axis=0).mean()),
                                  "floor_mean": float(floor.mean()), "refined_mean": float(ours.mean())}
    return out
