"""The lossy regime with real evaluations at T = 20 over all levels: TMPDiff against uniform levels, heuristics
and the evolutionary search at equal evaluation budgets, calibrated on one seed set and judged on unseen seeds.

Targets matched to a uniform level's cost (e.g. uniform int8's) give the paper's headline: TMPDiff's schedule
against the uniform level of the same cost, as a % change in each metric with a paired bootstrap interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from tmpdiff.calibration.baselines import evolutionary, heuristics_at_budget
from tmpdiff.calibration.refine import evaluation_cap, refine
from tmpdiff.calibration.search import CountingProblem, Schedule, measure_sensitivities, tmpdiff_search
from tmpdiff.calibration.session import CalibrationSession
from tmpdiff.eval.bootstrap import Interval, diff_ci, jackknife_ci, jackknife_interval, jackknife_values, mean_ci, relative_diff_ci
from tmpdiff.eval.judge import LOWER_IS_BETTER, judge
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.call_memo import CallMemo, attached
from tmpdiff.runtime.runner import initial_noise

# per-sample log-probabilities, and what their % change is of (see `compare`)
LOG_PROBABILITIES = {"log_prob": "geometric-mean p(class)"}


def search_matched(session: CalibrationSession, speedups: dict[str, float], metric: str,
                   on_progress: Callable[[str], None] = lambda _: None, refine_evaluations: int | None = None) -> dict:
    """Per target: TMPDiff knapsack, TMPDiff refined (within 3*T*L evaluations, or `refine_evaluations` more than the
    knapsack used), evolutionary at the refined search's evaluations, heuristics; schedules and evaluations of each
    (on the session's calibration set)."""
    base = session.with_metric(metric)
    counting = CountingProblem(base)
    on_progress("sensitivities")
    sens = measure_sensitivities(counting)
    sens_asked = set(counting.asked)
    out: dict = {"metric": metric, "sensitivity_evaluations": len(sens_asked), "cap": evaluation_cap(base),
                 "refine_evaluations": refine_evaluations, "targets": []}
    for label, speedup in speedups.items():
        on_progress(f"target {label} ({speedup:.3f}x)")
        budget = base.budget_for_speedup(speedup)
        counting.asked = set(sens_asked)
        knap, _ = tmpdiff_search(counting, budget, sens)
        knap_evals = len(counting.asked)
        left = max(0, evaluation_cap(base) - knap_evals)
        refined = refine(counting, knap, budget, left if refine_evaluations is None else min(left, refine_evaluations),
                         sens)
        refined_evals = len(counting.asked)
        evo_problem = CountingProblem(base)  # it may stop short of its allowance
        evo = evolutionary(evo_problem, budget, refined_evals, seed=session.problem.steps)
        methods = {"TMPDiff knapsack": (knap, knap_evals), "TMPDiff refined": (refined.schedule, refined_evals),
                   "evolutionary (same evaluations)": (evo, len(evo_problem.asked))}
        for kind, schedule in heuristics_at_budget(base, base.cheapest, budget).items():
            methods[kind] = (schedule, 0)
        out["targets"].append({"label": label, "speedup": speedup, "budget": budget,
                               "methods": {m: {"schedule": list(s), "evaluations": e,
                                               "calib_error": base.error(s)} for m, (s, e) in methods.items()}})
    return out


@torch.no_grad()
def judge_unseen(session: CalibrationSession, schedules: Sequence[Schedule], seed_groups: Sequence[Sequence[int]],
                 classifier_dir: str | None) -> dict[Schedule, dict[str, np.ndarray]]:
    """Per-sample judgements of each schedule on seeds the search never saw (groups the runner's batch size)."""
    ev = session.evaluator
    classes = list(ev.classes)
    out: dict[Schedule, dict[str, list]] = {tuple(s): {} for s in schedules}
    for group in seed_groups:
        labels = torch.tensor([c for _ in group for c in classes], dtype=torch.int64)
        noise = torch.cat([initial_noise(len(classes), ev.sampling.channels, ev.sampling.image_size, s) for s in group])
        ref = ev.runner.sample(sampling_scheduler(ev.sampling), labels, noise, [ev.reference] * ev.steps).latents.clone()
        for schedule in out:
            latents = ev.runner.sample(sampling_scheduler(ev.sampling), labels, noise, list(schedule)).latents
            for name, values in judge(latents, ref, labels, classifier_dir).items():
                out[schedule].setdefault(name, []).append(values)
    return {s: {k: np.concatenate(v) for k, v in m.items()} for s, m in out.items()}


def summarise(judged: dict[str, np.ndarray], real_features: np.ndarray | None, seed: int = 0, clusters=None) -> dict:
    """Mean and bootstrap interval of every per-sample metric; the low-dimensional FD with a jackknife interval.
    `clusters`: one id per sample (a pipeline's prompt), resampled whole (`bootstrap`)."""
    from tmpdiff.eval.quality import frechet_distance

    out = {k: mean_ci(v, seed=seed, clusters=clusters).as_dict() for k, v in judged.items() if k != "features"}
    if "features" in judged and real_features is not None:
        feats = judged["features"]
        out["fd_low"] = jackknife_ci(lambda i: frechet_distance(feats[i], real_features), len(feats),
                                     positive=True).as_dict()
    return out


def percent_interval(r: Interval) -> list[float | None]:
    """A relative change's interval in %, an unbounded end (resamples whose base mean is 0) as None: JSON has no
    infinity."""
    return [100 * end if math.isfinite(end) else None for end in (r.low, r.high)]


def format_percent(c: dict) -> str:
    """'+12.3% [+1.0, +20.5]' from a comparison's percent and percent_interval; 'n/a' without a percent."""
    if c.get("percent") is None:
        return "n/a"
    low, high = (f"{e:+.1f}" if e is not None else bound for e, bound in zip(c["percent_interval"], ("-inf", "+inf"), strict=True))
    return f"{c['percent']:+.1f}% [{low}, {high}]"


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], real_features: np.ndarray | None, seed: int = 0,
            clusters=None) -> dict:
    """a vs b per metric: difference, % change of b's mean (of its geometric-mean probability for a log-probability:
    `percent_of`), interval, whether it excludes 0 and which is better. `clusters`: one id per sample (a pipeline's
    prompt), resampled whole and paired (`bootstrap`)."""
    from tmpdiff.eval.quality import frechet_distance

    out = {}
    for name in [k for k in a if k != "features"]:
        d = diff_ci(a[name], b[name], seed=seed, clusters=clusters)
        if name in LOG_PROBABILITIES:
            # a mean log-probability near 0 (a saturated classifier) makes its relative change a ratio of two
            # near-zero numbers (-239% [-974, +62] once); exp(difference) - 1 is the % change of the geometric-mean
            # probability, and its interval the difference's, mapped (monotone)
            r = Interval(math.expm1(d.value), math.expm1(d.low), math.expm1(d.high))
        else:
            r = relative_diff_ci(a[name], b[name], seed=seed, clusters=clusters)
        out[name] = {"diff": d.as_dict(), "percent": None if r is None else 100 * r.value,
                     "percent_interval": None if r is None else percent_interval(r),
                     "percent_of": LOG_PROBABILITIES.get(name, "mean"),
                     "significant": d.excludes(0.0),
                     "better": (d.value < 0) == LOWER_IS_BETTER[name] if d.value != 0 else None}
    if "features" in a and real_features is not None:
        fa, fb = a["features"], b["features"]
        fd_a, fd_b = (jackknife_values(lambda i, f=f: frechet_distance(f[i], real_features), len(f)) for f in (fa, fb))
        d = jackknife_interval(fd_a - fd_b)
        r = jackknife_interval((fd_a - fd_b) / fd_b)
        out["fd_low"] = {"diff": d.as_dict(), "percent": 100 * r.value, "percent_interval": percent_interval(r),
                         "percent_of": "mean", "significant": d.excludes(0.0), "better": d.value < 0}
    return out


class UnseenJudge:
    """Per-sample judgements of schedules on unseen seed groups, the reference of each group run once."""

    def __init__(self, session: CalibrationSession, seed_groups: Sequence[Sequence[int]], classifier_dir: str | None
                 ) -> None:
        self.session = session
        self.groups = [list(g) for g in seed_groups]
        self.classifier_dir = classifier_dir
        self.cache: dict[Schedule, dict[str, np.ndarray]] = {}
        self._refs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.memo = CallMemo()  # schedules judged here share prefixes with each other
        self.fallbacks: dict[Schedule, int] = {}  # steps that fell back to a higher precision (NaN/Inf), all groups

    @torch.no_grad()
    def __call__(self, schedule: Sequence[str]) -> dict[str, np.ndarray]:
        key = tuple(schedule)
        if key in self.cache:
            return self.cache[key]
        ev = self.session.evaluator
        if not self._refs:
            for group in self.groups:
                labels = torch.tensor([c for _ in group for c in ev.classes], dtype=torch.int64)
                noise = torch.cat([initial_noise(len(ev.classes), ev.sampling.channels, ev.sampling.image_size, s)
                                   for s in group])
                ref = ev.runner.sample(sampling_scheduler(ev.sampling), labels, noise, [ev.reference] * ev.steps)
                self._refs.append((labels, noise, ref.latents.clone()))
        parts: dict[str, list] = {}
        for labels, noise, ref in self._refs:
            with attached(ev.runner, self.memo):
                result = ev.runner.sample(sampling_scheduler(ev.sampling), labels, noise, list(key))
            latents = result.latents
            self.fallbacks[key] = self.fallbacks.get(key, 0) + len(result.trace.fallbacks)
            for name, values in judge(latents, ref, labels, self.classifier_dir).items():
                parts.setdefault(name, []).append(values)
        self.cache[key] = {k: np.concatenate(v) for k, v in parts.items()}
        return self.cache[key]


def unseen_groups(calib_seeds: Sequence[int], unseen_seeds: Sequence[int]) -> list[list[int]]:
    """Unseen seeds in groups of the calibration set's size (the runner's batch); refuses overlaps and remainders."""
    from tmpdiff.formats.errors import TmpdiffError

    size = len(calib_seeds)
    if set(calib_seeds) & set(unseen_seeds):
        raise TmpdiffError(f"unseen seeds {sorted(set(calib_seeds) & set(unseen_seeds))} are calibration seeds too")
    if not unseen_seeds or len(unseen_seeds) % size:
        raise TmpdiffError(f"give a positive multiple of {size} unseen seeds (as many per group as calibration seeds), "
                           f"got {len(unseen_seeds)}")
    return [list(unseen_seeds[i : i + size]) for i in range(0, len(unseen_seeds), size)]
