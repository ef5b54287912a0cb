"""Issue 15: prefix-cached exhaustive evaluation, bootstrap intervals, refinement, the lossy bench report."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from tmpdiff.calibration.evaluator import Evaluation
from tmpdiff.calibration.exhaustive import build_table, load_table, merge_tables, optimum, tree_steps, walk_schedules
from tmpdiff.calibration.refine import evaluation_cap, neighbours, refine
from tmpdiff.calibration.search import Problem, measure_sensitivities
from tmpdiff.eval.bootstrap import diff_ci, jackknife_ci, jackknife_interval, jackknife_values, mean_ci, ratio_ci, relative_diff_ci
from tmpdiff.eval.metrics import latent_errors
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.models.schedulers import sampling_scheduler
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise

LEVEL_GAIN = {"fp32": 1.0, "int8": 0.97, "int4": 0.9}


class FakeEngine:
    """A cheap deterministic stand-in denoiser whose output depends on the level, latent, timestep and class."""

    device = "cpu"
    input_specs: list = []
    output_specs: list = []

    def __init__(self, precision: str) -> None:
        self.precision = precision

    def bind(self, inputs, outputs) -> None:
        self.inputs, self.outputs = inputs, outputs

    def run(self, stream) -> None:
        x, t, c = self.inputs["hidden_states"], self.inputs["timestep"], self.inputs["class_labels"]
        gain = LEVEL_GAIN[self.precision]
        self.outputs["noise_pred"].copy_(torch.tanh(gain * x + 1e-3 * t[:, None, None, None] * gain
                                                    + 0.05 * c[:, None, None, None].float()))

    def unbind(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def fake(bundled):
    from tmpdiff.models.bundled import sampling_info

    sampling = sampling_info(bundled)
    classes = [0, 3, 7]
    runner = ScheduledRunner({p: FakeEngine(p) for p in LEVEL_GAIN}, len(classes), sampling.channels,
                             sampling.image_size, sampling.guidance_scale, sampling.null_class, sampling.num_classes)
    labels = torch.tensor(classes)
    noise = initial_noise(len(classes), sampling.channels, sampling.image_size, 5)
    return runner, sampling, classes, labels, noise


def test_prefix_walk_equals_brute_force(fake):
    runner, sampling, _, labels, noise = fake
    levels, steps = ["fp32", "int8", "int4"], 4
    leaves = {}
    count = walk_schedules(runner, sampling_scheduler(sampling), labels, noise, levels, steps,
                           lambda s, x, fell: leaves.__setitem__(s, x.clone()))
    assert count == tree_steps(3, 4) == 3 + 9 + 27 + 81
    assert list(leaves) == list(itertools.product(levels, repeat=steps))
    assert len({x.sum().item() for x in leaves.values()}) > 40  # levels differ: a mixed-up prefix would show
    # every two-level schedule and a few three-level ones, sampled directly, match bit for bit
    rng = np.random.default_rng(0)
    checked = list(itertools.product(["fp32", "int4"], repeat=steps))
    checked += [tuple(rng.choice(levels, size=steps).tolist()) for _ in range(6)]
    for schedule in checked:
        direct = runner.sample(sampling_scheduler(sampling), labels, noise, list(schedule)).latents
        assert torch.equal(direct, leaves[schedule]), schedule


def test_table_optimum_is_the_brute_force_optimum(fake):
    runner, sampling, classes, _, _ = fake
    levels, steps, groups = ["fp32", "int4"], 4, [[1], [2]]
    tables = [build_table(runner, sampling, classes, [g], levels, "fp32", steps, None) for g in groups]
    table = merge_tables(tables)
    assert table.metrics["latent"].shape == (16, 6) and table.seeds == [1, 1, 1, 2, 2, 2]
    cost = {"fp32": 1.0, "int4": 0.45}
    budget = 2 * 1.0 + 2 * 0.45
    samples = table.samples_of([2])
    best, value = optimum(table, "latent", samples, cost, budget)
    # brute force: sample every schedule of seed 2 directly and measure
    labels = torch.tensor(classes)
    noise = initial_noise(len(classes), sampling.channels, sampling.image_size, 2)
    ref = runner.sample(sampling_scheduler(sampling), labels, noise, ["fp32"] * steps).latents.clone()
    brute = {}
    for schedule in itertools.product(levels, repeat=steps):
        if sum(cost[p] for p in schedule) <= budget * (1 + 1e-9):
            x = runner.sample(sampling_scheduler(sampling), labels, noise, list(schedule)).latents
            brute[schedule] = float(latent_errors(x, ref).mean())
    assert best == min(brute, key=brute.get)
    assert value == pytest.approx(brute[best], rel=1e-12)
    assert sum(p == "int4" for p in best) == 2  # the budget is used: cheaper is worse here


class NaNAtStep(FakeEngine):
    """int4 that overflows (NaN output) at one timestep, as a low-precision engine can; the NaN guard re-runs it."""

    def __init__(self, precision: str, timestep: float) -> None:
        super().__init__(precision)
        self.timestep = timestep

    def run(self, stream) -> None:
        super().run(stream)
        if float(self.inputs["timestep"][0]) == self.timestep:
            self.outputs["noise_pred"].fill_(float("nan"))


def test_walks_record_fallbacks_and_fallen_schedules_are_no_option(fake, tmp_path):
    # A schedule whose int4 step fell back to int8 scored int8's quality at int4's cost: before, the walk recorded
    # that score as the schedule's, so it could be the exhaustive optimum and the search could choose it.
    from tmpdiff.calibration.exhaustive import TableEvaluator, feasible_rows, save_table
    from tmpdiff.calibration.lossy import search_on_table

    _, sampling, classes, _, _ = fake
    steps, levels = 4, ["fp32", "int8", "int4"]
    scheduler = sampling_scheduler(sampling)
    from tmpdiff.models.schedulers import set_sampling_timesteps

    set_sampling_timesteps(scheduler, steps, None)
    bad_t = float(scheduler.timesteps[2])
    engines = {p: FakeEngine(p) for p in ("fp32", "int8")} | {"int4": NaNAtStep("int4", bad_t)}
    runner = ScheduledRunner(engines, len(classes), sampling.channels, sampling.image_size, sampling.guidance_scale,
                             sampling.null_class, sampling.num_classes)
    table = merge_tables([build_table(runner, sampling, classes, [[g]], levels, "fp32", steps, None) for g in (1, 2)])
    fell = [s for s in table.schedules if s[2] == "int4"]
    assert int(table.fell_back().sum()) == len(fell) == 27
    assert all(table.fallbacks[table.row(s)].min() == 1 for s in fell)
    assert not table.fallbacks[[table.row(s) for s in table.schedules if s[2] != "int4"]].any()
    cost = {"fp32": 1.0, "int8": 0.6, "int4": 0.45}
    rows = feasible_rows(table, cost, 4.0)
    assert len(rows) == 81 - 27 and all(table.schedules[r][2] != "int4" for r in rows)
    samples = table.samples_of([1])
    evaluation = TableEvaluator(table, samples)(("fp32", "fp32", "int4", "fp32"))
    assert evaluation.fallbacks == 1
    # the cheapest budget with a legal schedule: int4 everywhere but step 2 (int8)
    budget = 3 * 0.45 + 0.6
    best, _ = optimum(table, "latent", samples, cost, budget)
    assert best == ("int4", "int4", "int8", "int4")
    found = search_on_table(table, samples, cost, "fp32", "latent", budget)
    assert found["refined"][2] != "int4" and found["knapsack"][2] != "int4"
    from tmpdiff.calibration.lossy import exhaustive_comparison
    from tmpdiff.calibration.lossy_report import _render_exhaustive, fallback_lines

    compared = exhaustive_comparison(table, [1], [2], cost, "fp32", metrics=("latent",), speedups=[1.6])
    assert compared["fell_back_schedules"] == 27
    methods = compared["rows"][0]["methods"]
    assert not methods["TMPDiff refined"]["fell_back"] and not methods["calibration optimum"]["fell_back"]
    assert "27 schedules fell back to a higher precision" in "\n".join(_render_exhaustive("b", compared))
    rows = [{"method": "uniform int4", "schedule": ["int4"] * steps, "fallbacks": {"calib": 1, "unseen": 2}},
            {"method": "uniform int8", "schedule": ["int8"] * steps, "fallbacks": {"calib": 0, "unseen": 0}}]
    note = fallback_lines(rows)[0]
    assert "uniform int4 (`4444`: calibration 1, unseen 2)" in note and "int8" not in note
    assert fallback_lines(rows[1:]) == []
    save_table(table, tmp_path / "t.npz")
    again = load_table(tmp_path / "t.npz")
    assert np.array_equal(again.fallbacks, table.fallbacks)
    old = load_table(tmp_path / "t.npz")
    old.fallbacks = None  # a table walked before fallbacks were recorded: taken as none, and merges with a new one
    merged = merge_tables([old, table])
    assert merged.fallbacks.shape == (81, 2 * len(table.seeds)) and not merged.fallbacks[:, : len(table.seeds)].any()


def test_bootstrap_interval_contains_the_mean_and_shrinks():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    a, b = mean_ci(small), mean_ci(large)
    assert a.low < small.mean() < a.high and b.low < large.mean() < b.high
    assert (b.high - b.low) < 0.3 * (a.high - a.low)
    x = rng.normal(0, 1, 200)
    assert diff_ci(x + 0.5, x).excludes(0.0)  # paired: the shift is exact
    assert not diff_ci(x, rng.permutation(x)).excludes(0.0)
    assert ratio_ci(2 * np.abs(x) + 1, np.abs(x) + 0.5).value == pytest.approx(2.0)
    unformed = ratio_ci(np.ones(5), np.zeros(5))  # every draw divides by 0: no interval, so nothing is significant
    assert np.isnan(unformed.low) and not unformed.excludes(1.0)
    # a base whose resampled mean is 0 in about a third of the resamples (one non-zero sample in 10): those draws
    # divide by 0; dropping them (as before) gave a finite upper end, they make it unbounded
    base, other = np.array([0.0] * 9 + [1.0]), np.ones(10)
    for interval in (relative_diff_ci(other, base), ratio_ci(other, base)):
        assert np.isfinite(interval.value) and np.isfinite(interval.low) and interval.high == np.inf, interval
    from tmpdiff.calibration.matched import compare, format_percent

    change = compare({"latent": other}, {"latent": base}, None)["latent"]  # its JSON has no infinity
    assert change["percent_interval"][1] is None and json.loads(json.dumps(change, allow_nan=False)) == change
    assert format_percent(change).endswith(", +inf]")
    j_small, j_large = (jackknife_ci(lambda i, v=v: float(np.var(v[i])), len(v)) for v in (small, large))
    assert j_small.low < j_small.value < j_small.high and j_large.low < j_large.value < j_large.high
    assert (j_large.high - j_large.low) < 0.3 * (j_small.high - j_small.low)
    # a distance near 0 with a wide spread: the symmetric interval reaches below 0, the log-scale one does not
    near_zero = np.abs(rng.normal(0, 1, 12)) ** 4
    symmetric = jackknife_ci(lambda i: float(near_zero[i].mean()), len(near_zero))
    positive = jackknife_ci(lambda i: float(near_zero[i].mean()), len(near_zero), positive=True)
    assert symmetric.low < 0 < positive.low < positive.value < positive.high
    assert positive.value / positive.low == pytest.approx(positive.high / positive.value)


def test_clustered_jackknife_leaves_out_whole_clusters():
    """Text-to-image samples are prompts x seeds; the FD's jackknife left out one sample at a time while its bootstrap
    intervals resample prompts. With clusters each leave-out set drops a whole cluster; clusters of one sample are the
    plain jackknife."""
    rows_seen: list[tuple[int, ...]] = []

    def statistic(rows):
        rows_seen.append(tuple(int(r) for r in rows))
        return float(len(rows))

    clusters = [7, 7, 3, 3, 9, 9]
    values = jackknife_values(statistic, 6, clusters)
    assert values.tolist() == [6.0, 4.0, 4.0, 4.0]
    assert rows_seen[1:] == [(0, 1, 4, 5), (2, 3, 4, 5), (0, 1, 2, 3)]  # clusters 3, 7, 9 left out in turn
    single = [float(x) for x in np.arange(5) ** 2]
    assert np.array_equal(jackknife_values(lambda r: sum(single[i] for i in r), 5, list(range(5))),
                          jackknife_values(lambda r: sum(single[i] for i in r), 5))
    # correlated pairs: the grouped standard error is wider than the one that takes the pair's samples as independent
    rng = np.random.default_rng(0)
    per_prompt = rng.normal(0, 1, 30)
    x = np.repeat(per_prompt, 2) + rng.normal(0, 0.2, 60)
    grouped = jackknife_interval(jackknife_values(lambda r: x[r].mean(), 60, np.repeat(np.arange(30), 2)))
    plain = jackknife_interval(jackknife_values(lambda r: x[r].mean(), 60))
    assert grouped.high - grouped.low > 1.2 * (plain.high - plain.low)
    with pytest.raises(TmpdiffError, match="at least 3 clusters, got 2"):
        jackknife_values(statistic, 4, [0, 0, 1, 1])


def test_jackknife_of_derived_statistics_equals_recomputing_them():
    # compare() and the pipeline judge build the FD difference and its ratio from each schedule's leave-one-out FDs,
    # computed once; the intervals must be those of the composed statistic recomputed per leave-one-out set
    from tmpdiff.eval.quality import frechet_distance

    rng = np.random.default_rng(3)
    real, fa, fb = rng.normal(0, 1, (200, 4)), rng.normal(0.3, 1, (15, 4)), rng.normal(0.1, 1.2, (15, 4))
    fd_a, fd_b = (jackknife_values(lambda i, f=f: frechet_distance(f[i], real), len(f)) for f in (fa, fb))
    assert len(fd_a) == 16 and fd_a[0] == frechet_distance(fa, real)
    recomputed = jackknife_ci(lambda i: frechet_distance(fa[i], real) - frechet_distance(fb[i], real), 15)
    assert jackknife_interval(fd_a - fd_b) == recomputed
    ratio = jackknife_ci(lambda i: (frechet_distance(fa[i], real) - frechet_distance(fb[i], real))
                         / frechet_distance(fb[i], real), 15)
    assert jackknife_interval((fd_a - fd_b) / fd_b) == ratio
    assert jackknife_interval(fd_a, positive=True) == jackknife_ci(lambda i: frechet_distance(fa[i], real), 15,
                                                                     positive=True)


def test_a_log_probability_changes_by_its_geometric_mean_probability():
    # a saturated classifier: log p(class) within 1e-6 of 0 for both schedules; the relative change of the means is a
    # ratio of near-zero numbers (it read -239% [-974, +62] in a report), the geometric-mean probability's is ~0%
    from tmpdiff.calibration.matched import compare

    rng = np.random.default_rng(5)
    b = -np.abs(rng.normal(0, 1e-6, 40))
    a = b - np.abs(rng.normal(0, 1e-6, 40))
    plain = relative_diff_ci(a, b)
    assert abs(plain.value) > 0.5  # the relative change of the means: over 50%
    c = compare({"log_prob": a, "latent": np.abs(a)}, {"log_prob": b, "latent": np.abs(b)}, None)["log_prob"]
    assert c["percent_of"] == "geometric-mean p(class)"
    assert c["percent"] == pytest.approx(100 * np.expm1(a.mean() - b.mean())) and abs(c["percent"]) < 1e-3
    low, high = c["percent_interval"]
    assert low <= c["percent"] <= high and high - low < 1e-3
    assert c["diff"]["value"] == pytest.approx(a.mean() - b.mean()) and c["better"] is False
    # a real loss of confidence: mean log p down by 0.1 nats is the geometric-mean p down by 9.5%
    c = compare({"log_prob": b - 0.1}, {"log_prob": b}, None)["log_prob"]
    assert c["percent"] == pytest.approx(-9.516, abs=1e-3) and c["significant"]
    # other metrics keep the relative change of their means
    assert compare({"latent": np.abs(a)}, {"latent": np.abs(b)}, None)["latent"]["percent_of"] == "mean"


def test_relative_difference_of_errors_stays_above_minus_100_percent():
    # heavy-tailed per-sample errors, a schedule that removes most of them: the difference's interval divided by the
    # full-sample mean reaches below -100% (an error below 0); each resample's own relative change cannot
    rng = np.random.default_rng(1)
    base = rng.lognormal(0.0, 1.5, 40)
    better = 0.2 * base * rng.uniform(0.5, 1.5, 40)
    d, r = diff_ci(better, base), relative_diff_ci(better, base)
    assert d.low / base.mean() < -1.0
    assert -1.0 < r.low < r.value < r.high < 0.0
    assert r.value == pytest.approx(better.mean() / base.mean() - 1.0)
    assert relative_diff_ci(base, np.zeros_like(base)) is None


def _interacting_problem(steps: int = 8) -> Problem:
    """A 2-level problem whose error has adjacent-step interactions the additive scores cannot see."""
    weight = np.linspace(2.0, 0.2, steps)

    def evaluate(schedule):
        cheap = np.array([p == "int4" for p in schedule], dtype=float)
        err = float(weight @ cheap + 1.5 * (cheap[:-1] * cheap[1:]).sum())
        return Evaluation(tuple(schedule), err, 1.0 - err / 100, 30.0)

    return Problem.create(steps, "fp32", {"fp32": 1.0, "int4": 0.45}, "latent", evaluate)


def test_refinement_never_worse_and_within_its_cap():
    problem = _interacting_problem()
    T = problem.steps
    budget = 5 * 1.0 + 3 * 0.45
    rng = np.random.default_rng(1)
    improved = 0
    for _ in range(12):
        cheap = set(rng.choice(T, size=3, replace=False).tolist())
        start = tuple("int4" if t in cheap else "fp32" for t in range(T))
        for cap in (0, 3, evaluation_cap(problem)):
            result = refine(problem, start, budget, cap)
            assert result.error <= problem.error(start)
            assert result.evaluations <= cap
            assert problem.schedule_cost(result.schedule) <= budget * (1 + 1e-9)
            improved += result.error < problem.error(start)
    assert improved > 0  # it does move off bad starts
    # with room to spare, the adjacent-cheap start is refined to the true optimum (non-adjacent, last steps)
    best = min((s for s in itertools.product(["fp32", "int4"], repeat=T)
                if problem.schedule_cost(s) <= budget * (1 + 1e-9)), key=problem.error)
    assert refine(problem, tuple(["fp32"] * 5 + ["int4"] * 3), budget, 100).error == pytest.approx(problem.error(best))


def test_refinement_lowers_a_step_alone_where_cheap_steps_cancel():
    """At one cheap step's budget the optimum has two adjacent cheap steps whose errors cancel (as measured on the
    text-to-image model); only a move that lowers a step alone reaches it from a one-cheap-step start."""
    T = 8

    def evaluate(schedule):
        cheap = np.array([p == "int4" for p in schedule], dtype=float)
        err = float(np.full(T, 3.0) @ cheap - cheap[4] - cheap[5] - 3.5 * cheap[4] * cheap[5])
        return Evaluation(tuple(schedule), err, 1.0 - err / 100, 30.0)

    problem = Problem.create(T, "fp32", {"fp32": 1.0, "int4": 0.45}, "latent", evaluate)
    budget = (T - 1) * 1.0 + 0.45
    start = tuple("int4" if t == 4 else "fp32" for t in range(T))
    result = refine(problem, start, budget, evaluation_cap(problem))
    assert result.schedule == tuple("int4" if t in (4, 5) else "fp32" for t in range(T))
    assert result.error == pytest.approx(0.5) and ((5, "int4"),) in result.moves


def test_refinement_moves_an_adjacent_pair_and_ranks_it_by_the_measured_pair():
    """Two adjacent cheap steps at the start are a local optimum for every single-step move; the optimum puts the
    pair where its errors cancel (steps 4 and 5). The pair swap reaches it, and the measured adjacent-pair probe
    ranks that move first, where the additive scores alone rank it last."""
    T = 8
    weight = np.array([1.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])

    def evaluate(schedule):
        cheap = np.array([p == "int4" for p in schedule], dtype=float)
        err = float(weight @ cheap - 5.0 * cheap[4] * cheap[5])
        return Evaluation(tuple(schedule), err, 1.0 - err / 100, 30.0)

    problem = Problem.create(T, "fp32", {"fp32": 1.0, "int4": 0.45}, "latent", evaluate)
    budget = (T - 2) * 1.0 + 2 * 0.45
    start = tuple("int4" if t in (0, 1) else "fp32" for t in range(T))
    target = tuple("int4" if t in (4, 5) else "fp32" for t in range(T))
    result = refine(problem, start, budget, evaluation_cap(problem))
    assert result.schedule == target and result.error == pytest.approx(1.0)
    sens = measure_sensitivities(problem)
    assert sens.adjacent[4] == pytest.approx(-5.0) and sens.adjacent[0] == pytest.approx(0.0)
    assert neighbours(problem, start, budget, sens)[0][2] == target
    assert refine(problem, start, budget, 1, sens).schedule == target  # its first evaluation


def test_refinement_pays_for_a_raise_with_several_lowerings():
    """With close cheap costs (fp8 0.55, int4 0.45) raising a step to fp32 takes five fp8 -> int4 lowerings to pay
    for: no move of one or two steps reaches the optimum from uniform fp8, the raise paid by several lowerings does."""
    T = 8
    first = {"fp32": 0.0, "fp8": 10.0, "int4": 12.0}  # the first step is the one that matters
    later = {"fp32": 0.0, "fp8": 0.1, "int4": 0.5}

    def evaluate(schedule):
        err = first[schedule[0]] + sum(later[p] for p in schedule[1:])
        return Evaluation(tuple(schedule), err, 1.0 - err / 100, 30.0)

    problem = Problem.create(T, "fp32", {"fp32": 1.0, "fp8": 0.55, "int4": 0.45}, "latent", evaluate)
    budget = T * 0.55
    start = tuple(["fp8"] * T)
    best = min((s for s in itertools.product(problem.all_levels, repeat=T)
                if problem.schedule_cost(s) <= budget * (1 + 1e-9)), key=problem.error)
    assert best[0] == "fp32" and problem.error(best) == pytest.approx(2.7)
    assert refine(problem, start, budget, evaluation_cap(problem)).schedule == start  # no sensitivities: stuck
    sens = measure_sensitivities(problem)
    result = refine(problem, start, budget, evaluation_cap(problem), sens)
    assert result.error == pytest.approx(problem.error(best))
    assert len(result.moves[0]) == 6  # one raise, five lowerings, in one move


def test_size_curve_sizes_halve_the_calibration_set():
    from tmpdiff.calibration.lossy import halving_sizes

    assert halving_sizes(20) == [5, 10, 20] and halving_sizes(16) == [4, 8, 16] and halving_sizes(3) == [3]


def test_lossy_report_names_the_costs_origin(fake, tmp_path):
    from tmpdiff.calibration.exhaustive import save_table
    from tmpdiff.calibration.lossy_report import write_report
    from tmpdiff.formats.costs import CostsTable, save_costs

    runner, sampling, classes, _, _ = fake
    paths = []
    for group in ([1], [2], [3]):
        table = build_table(runner, sampling, classes, [group], ["fp32", "int4"], "fp32", 4, None)
        paths.append(tmp_path / f"t{group[0]}.npz")
        save_table(table, paths[-1])
    save_costs(CostsTable.stated("Test GPU", {"fp32": 1.0, "int4": 0.45}, "assumed ratios", None), tmp_path / "c.json")
    config = {"costs": str(tmp_path / "c.json"),
              "exhaustive": {"a": {"tables": [str(p) for p in paths], "calib_seeds": [1, 2], "unseen_seeds": [3],
                                   "curve": {"pool_seeds": [1, 2], "sizes": [3, 6], "draws": 1},
                                   "floor": {"splits": 4}, "split_curve": {"sizes": [2, 4], "splits": 2}},
                           # the same tables read as a pipeline's walk: samples are prompts x seeds
                           "p": {"tables": [str(p) for p in paths], "calib_seeds": [1, 2], "unseen_seeds": [3],
                                 "calib_classes": classes[:2], "unseen_classes": list(classes),
                                 "curve": {"pool_seeds": [1, 2], "sizes": [2, 4], "draws": 2},
                                 "sample_unit": "prompts", "walk_note": "one pipeline call per seed"}}}
    report = write_report(tmp_path, config)
    rendered = (tmp_path / "bench_lossy.md").read_text()
    assert "seeds [1, 2] x 2 prompts" in rendered and "(one pipeline call per seed)" in rendered
    merged = merge_tables([load_table(p) for p in paths])
    pool = set(merged.samples_of([1, 2], classes[:2]).tolist())  # the curve draws from the calibration prompts only
    drawn = [set(run["samples"]) for point in report["parts"]["p"]["size_curve"]["points"] for run in point["runs"]]
    assert len(pool) == 4 and all(d <= pool for d in drawn) and pool in drawn
    saved = json.loads((tmp_path / "bench_lossy.json").read_text())
    assert saved["costs_table"]["origin"] == "stated" and saved["costs_table"]["device"] == "Test GPU"
    assert "not measured here" in (tmp_path / "bench_lossy.md").read_text()
    rows = report["parts"]["a"]["rows"]
    assert [r["budget_label"] for r in rows if r["metric"] == "latent"] == ["K=1", "K=2", "K=3"]
    for row in rows:
        m = row["methods"]
        assert m["calibration optimum"]["calib_ratio"] == pytest.approx(1.0)
        assert all(v["calib_ratio"] >= 1 - 1e-9 for v in m.values())  # nothing beats the optimum on its samples
        assert m["TMPDiff refined"]["calib"] <= m["TMPDiff knapsack"]["calib"]
        assert m["TMPDiff refined"]["evaluations"] <= 3 * 4 * 2
        ratio = m["TMPDiff refined"]["unseen"]["ratio_to_optimum"]
        assert ratio["value"] >= 1 - 1e-9
    floor = report["parts"]["a"]["selection_floor"]
    assert floor["splits"] == 4 and len(floor["rows"]) == len(rows)
    for row in floor["rows"]:  # judged on half B against B's own optimum: nothing chosen elsewhere beats it
        assert len(row["floor"]) == len(row["refined"]) == 4
        assert min(row["floor"] + row["refined"]) >= 1 - 1e-9
    for metric, summary in floor["summary"].items():
        means = [np.mean(r["floor"]) for r in floor["rows"] if r["metric"] == metric]
        assert summary["floor_mean_worst_budget"] >= max(means) - 1e-12  # worst budget per split, then the mean
    assert "What any choice made on 1 samples reaches" in (tmp_path / "bench_lossy.md").read_text()
    split = report["parts"]["a"]["split_curve"]  # seeds 1-3 x 3 classes, halved: 4 unseen samples per halving
    assert split["samples"] == 9 and split["unseen_samples"] == 4 and split["sizes"] == [2, 4]
    assert "over 2 random halvings of all 9 samples" in (tmp_path / "bench_lossy.md").read_text()
    assert (tmp_path / "lossy.png").stat().st_size > 1000


def test_compact_merges_tables_as_float32_and_never_overwrites(fake, tmp_path):
    """`bench_lossy.py compact` (tables kept in the repository): one table, float32 metrics equal to the walks' to
    float32 rounding, the same optimum; an existing file is refused and left as it was."""
    import subprocess
    import sys
    from pathlib import Path

    from tmpdiff.calibration.exhaustive import save_table

    runner, sampling, classes, _, _ = fake
    paths = []
    for group in ([1], [2]):
        paths.append(tmp_path / f"t{group[0]}.npz")
        save_table(build_table(runner, sampling, classes, [group], ["fp32", "int4"], "fp32", 4, None), paths[-1])
    made = {"build": "b", "host": {"device": "cpu: x"}, "precisions": {}}
    (tmp_path / "t1.provenance.json").write_text(json.dumps(made))  # t2's walk recorded none
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_lossy.py"
    args = [sys.executable, str(script), "compact", "--out", str(tmp_path / "kept"), "--name", "m.npz", "--tables",
            *map(str, paths)]
    subprocess.run(args, check=True, capture_output=True)
    # what made each walk's engines, carried beside the merged table
    assert json.loads((tmp_path / "kept" / "m.provenance.json").read_text()) == {"t1.npz": made, "t2.npz": None}
    merged, compact = merge_tables([load_table(p) for p in paths]), load_table(tmp_path / "kept" / "m.npz")
    assert compact.seeds == merged.seeds and compact.features is None
    for name, values in merged.metrics.items():
        assert compact.metrics[name].dtype == np.float32
        assert np.allclose(compact.metrics[name], values, rtol=1e-6, atol=0)
    samples = compact.samples_of([1, 2])
    cost = {"fp32": 1.0, "int4": 0.45}
    assert optimum(compact, "latent", samples, cost, 3.45)[0] == optimum(merged, "latent", samples, cost, 3.45)[0]
    before = (tmp_path / "kept" / "m.npz").read_bytes()
    again = subprocess.run(args[:-1], capture_output=True, text=True)  # other tables, the same name
    assert again.returncode != 0 and "exists" in again.stderr
    assert (tmp_path / "kept" / "m.npz").read_bytes() == before


def _prompt_table(steps: int = 3, calib_prompts: int = 4, unseen_prompts: int = 8, noise: float = 0.6,
                  twin_seeds: bool = True, seed: int = 0):
    """fp32/int4 schedules on prompts x seeds (labels are prompts): calibration prompts under seed 0, unseen ones under
    seeds 100 and 101; with `twin_seeds` a prompt's two unseen samples are equal (fully correlated)."""
    from tmpdiff.calibration.exhaustive import SampleTable

    rng = np.random.default_rng(seed)
    schedules = list(itertools.product(["fp32", "int4"], repeat=steps))
    base = np.array([sum(w for w, p in zip(np.linspace(2.0, 1.0, steps), s, strict=True) if p == "int4")
                     for s in schedules])

    def block(n):
        return base[:, None] * (1 + noise * rng.standard_normal((len(schedules), n))) ** 2 + 1e-3

    calib, u100 = block(calib_prompts), block(unseen_prompts)
    values = np.concatenate([calib, u100, u100 if twin_seeds else block(unseen_prompts)], axis=1)
    prompts = list(range(calib_prompts, calib_prompts + unseen_prompts))
    table = SampleTable(steps, ["fp32", "int4"], seeds=[0] * calib_prompts + [100] * unseen_prompts + [101] * unseen_prompts,
                        labels=list(range(calib_prompts)) + prompts + prompts,
                        metrics={"latent": values, "one_minus_ssim": values * 0.1, "psnr": 40 - 10 * np.log10(values)})
    return table, list(range(calib_prompts)), prompts


def test_clustered_bootstrap_resamples_clusters_whole_and_paired():
    """Samples of one cluster (a prompt under two seeds) resampled together: two identical copies of each value give
    the interval of the values once, not a narrower one; singletons are the unclustered bootstrap."""
    rng = np.random.default_rng(3)
    x, y = rng.exponential(size=15), rng.exponential(size=15)
    twice = np.concatenate([x, x])
    clusters = np.concatenate([np.arange(15), np.arange(15)])
    for got, want in ((mean_ci(twice, clusters=clusters), mean_ci(x)),
                      (diff_ci(twice, np.concatenate([y, y]), clusters=clusters), diff_ci(x, y)),
                      (ratio_ci(twice, np.concatenate([y, y]), clusters=clusters), ratio_ci(x, y)),
                      (relative_diff_ci(twice, np.concatenate([y, y]), clusters=clusters), relative_diff_ci(x, y))):
        assert got.as_dict() == pytest.approx(want.as_dict(), rel=1e-9)
    iid = mean_ci(twice)
    assert iid.high - iid.low < 0.85 * (mean_ci(x).high - mean_ci(x).low)  # what treating copies as independent does
    assert mean_ci(x, clusters=np.arange(15)).as_dict() == pytest.approx(mean_ci(x).as_dict(), rel=1e-9)
    with pytest.raises(TmpdiffError, match="at least 2 clusters"):
        mean_ci(x, clusters=np.zeros(15))


def test_pipeline_tables_are_judged_by_prompt():
    """On a table of prompts x seeds (`sample_unit` "prompts"), the unseen intervals resample prompts: with a prompt's
    two seeds identical they are those of one seed's samples; a class-conditional table keeps resampling samples."""
    from tmpdiff.calibration.lossy import exhaustive_comparison

    table, calib_prompts, unseen_prompts = _prompt_table()
    cost = {"fp32": 1.0, "int4": 0.45}
    kwargs = {"metrics": ("latent",), "calib_classes": calib_prompts, "unseen_classes": unseen_prompts}
    both = exhaustive_comparison(table, [0], [100, 101], cost, "fp32", sample_unit="prompts", **kwargs)
    one = exhaustive_comparison(table, [0], [100], cost, "fp32", sample_unit="prompts", **kwargs)
    iid = exhaustive_comparison(table, [0], [100, 101], cost, "fp32", **kwargs)
    assert both["sample_unit"] == "prompts" and "sample_unit" not in iid
    for b, o, i in zip(both["rows"], one["rows"], iid["rows"], strict=True):
        for method in b["methods"]:
            ub, uo, ui = (r["methods"][method]["unseen"] for r in (b, o, i))
            for key in ("mean", "ratio_to_optimum"):
                assert ub[key] == pytest.approx(uo[key], rel=1e-9)
            width = ub["mean"]["high"] - ub["mean"]["low"]
            assert ui["mean"]["high"] - ui["mean"]["low"] <= width + 1e-12


def test_ratio_interval_reselects_the_optimum_per_resample():
    """The ratio to the unseen optimum: the value is to the optimum of the unseen samples, and every resample picks
    its own optimum among the budget's schedules, so no interval of a schedule within budget reaches below 1 (held
    fixed, the optimum loses to other schedules on some resamples)."""
    from tmpdiff.calibration.exhaustive import feasible_rows
    from tmpdiff.calibration.lossy import exhaustive_comparison
    from tmpdiff.eval.bootstrap import bootstrap_weights, ratio_to_best_ci

    table, calib_prompts, unseen_prompts = _prompt_table(steps=4, calib_prompts=3, unseen_prompts=10, noise=1.0,
                                                         twin_seeds=False, seed=5)
    cost = {"fp32": 1.0, "int4": 0.45}
    result = exhaustive_comparison(table, [0], [100], cost, "fp32", metrics=("latent",), calib_classes=calib_prompts,
                                   unseen_classes=unseen_prompts)
    unseen = table.samples_of([100], unseen_prompts)
    lows = []
    for seed, row in enumerate(result["rows"]):
        for method in row["methods"].values():
            ratio = method["unseen"]["ratio_to_optimum"]
            values = table.values("latent", method["schedule"], unseen)
            assert ratio["value"] == pytest.approx(values.mean() / row["optimum_unseen"]["value"], rel=1e-6)
            assert ratio["low"] >= 1 - 1e-9
            lows.append(ratio["low"])
        # the same draws by brute force: per resample, the optimum's mean among the budget's schedules
        rows = feasible_rows(table, cost, row["budget"])
        candidates = table.metrics["latent"][rows][:, unseen]
        weights = bootstrap_weights(len(unseen), 200, seed)
        schedule = row["methods"]["TMPDiff refined"]["schedule"]
        x = table.values("latent", schedule, unseen)
        draws = [(w @ x / w.sum()) / min(w @ c / w.sum() for c in candidates) for w in weights]
        got = ratio_to_best_ci(x, candidates, resamples=200, seed=seed)
        assert [got.low, got.high] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])), rel=1e-9)
    assert min(lows) < 1.05  # some interval reaches near 1: the check above is not vacuous


def test_fd_jackknife_interval_contains_its_estimate_where_the_percentile_bootstrap_does_not():
    # scripts/bench_mteo.py judged FD with a percentile bootstrap over the generated samples: resampling with
    # replacement duplicates samples, which biases FD upward, and the committed reports read e.g. 101.3 [115.5, 275.7].
    # 60 synthetic samples in 16 dimensions (the bench: 100 in 16) against a fixed real set
    from tmpdiff.eval.bootstrap import statistic_ci
    from tmpdiff.eval.quality import frechet_distance

    rng = np.random.default_rng(0)
    real, gen = rng.normal(0, 1, (1000, 16)), rng.normal(0.3, 1, (60, 16))

    def fd(i):
        return frechet_distance(gen[i], real)

    jackknife = jackknife_ci(fd, len(gen), positive=True)
    percentile = statistic_ci(fd, len(gen), resamples=200)
    assert jackknife.value == percentile.value == frechet_distance(gen, real)
    assert jackknife.low < jackknife.value < jackknife.high
    assert percentile.low > percentile.value  # the old interval lies wholly above its own estimate


def test_stochastic_step_noise_is_seeded_and_the_walk_draws_it_as_each_run_does(fake):
    # DDPM (and Euler ancestral, SDE solvers) draw noise at every step: it came from torch's global generator, so one seed gave another
    # image on every run and two schedules judged on one seed saw different noise
    from diffusers import DDPMScheduler

    runner, sampling, _, labels, noise = fake

    def ancestral():
        return DDPMScheduler.from_config(sampling_scheduler(sampling).config)

    schedule = ["fp32", "int4", "fp32", "int8"]
    first = runner.sample(ancestral(), labels, noise, schedule).latents.clone()
    torch.manual_seed(123)  # the global generator no longer matters
    assert torch.equal(first, runner.sample(ancestral(), labels, noise, schedule).latents)
    other = runner.sample(ancestral(), labels, noise, schedule, step_seed=1).latents
    assert (other - first).abs().max() > 1e-3  # the seed does reach the step noise
    leaves = {}
    walk_schedules(runner, ancestral(), labels, noise, ["fp32", "int4"], 3,
                   lambda s, x, fell: leaves.__setitem__(s, x.clone()))
    for s, walked in leaves.items():
        assert torch.equal(walked, runner.sample(ancestral(), labels, noise, list(s)).latents), s
