"""Calibration: the knapsack is exact, sensitivities sample adaptively, the CLI refuses bad targets early."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tmpdiff.calibration.knapsack import solve_mckp
from tmpdiff.calibration.sensitivity import adaptive_curve
from tmpdiff.formats.errors import TmpdiffError


def _brute_force(costs, scores, budget):
    """Best summed score over all L^T choices within budget (the solver's 1e-9 relative tolerance), and all costs."""
    steps, levels = len(costs), len(costs[0])
    choices = np.array(list(itertools.product(range(levels), repeat=steps)))
    total_cost = np.array([sum(costs[t][i] for t, i in enumerate(c)) for c in choices])
    total_score = np.array([sum(scores[t][i] for t, i in enumerate(c)) for c in choices])
    feasible = total_cost <= budget * (1 + 1e-9)
    return (float(total_score[feasible].min()) if feasible.any() else None), total_cost


def _knapsack_instance(kind, rng, steps, levels):
    if kind == "integer":
        costs = rng.integers(1, 10, (steps, levels)).tolist()
    elif kind == "float":
        costs = rng.uniform(1, 3, (steps, levels)).tolist()
    elif kind == "shared":  # calibration's case: the same per-level costs at every step
        costs = [rng.uniform(1, 3, levels).tolist()] * steps
    else:  # mixed: some steps share a cost row, others have their own
        row = rng.uniform(1, 3, levels).tolist()
        costs = [row if t % 2 else rng.uniform(1, 3, levels).tolist() for t in range(steps)]
    scores = rng.normal(0, 1, (steps, levels)).tolist()  # any sign, no order between levels
    return costs, scores


@pytest.mark.parametrize("kind", ["integer", "float", "shared", "mixed"])
@pytest.mark.parametrize("seed", range(4))
def test_knapsack_matches_brute_force(kind, seed):
    rng = np.random.default_rng(seed)
    steps, levels = 6 + seed % 3, 3
    costs, scores = _knapsack_instance(kind, rng, steps, levels)
    nothing, total_cost = _brute_force(costs, scores, 0.5)
    assert nothing is None  # every cost is >= 1
    unconstrained = sum(min(row) for row in scores)
    # budgets hit exactly by some choice (the cheapest one, random ones) and budgets in between
    budgets = [float(total_cost.min()), *rng.choice(total_cost, 4).tolist(),
               *rng.uniform(total_cost.min(), total_cost.max(), 3).tolist()]
    binding = 0
    for budget in budgets:
        best, _ = _brute_force(costs, scores, budget)
        picks = solve_mckp(costs, scores, budget)
        assert len(picks) == steps
        assert sum(costs[t][i] for t, i in enumerate(picks)) <= budget * (1 + 1e-9)
        assert sum(scores[t][i] for t, i in enumerate(picks)) == pytest.approx(best, abs=1e-9)
        binding += best > unconstrained + 1e-9
    assert binding >= 2  # the budget really constrains most of these instances (not just the shortcut)


def test_knapsack_refuses_an_impossible_budget():
    with pytest.raises(TmpdiffError, match="no schedule fits"):
        solve_mckp([[3.0, 2.0]] * 4, [[0.0, 1.0]] * 4, 7.99)
    assert solve_mckp([[3.0, 2.0]] * 4, [[0.0, 1.0]] * 4, 8.0) == [1, 1, 1, 1]


def test_knapsack_exact_budget_is_feasible():
    costs = [[28.8, 22.76]] * 10
    for k in range(11):
        budget = 22.76 * k + 28.8 * (10 - k)
        picks = solve_mckp(costs, [[0, 1.0 + t] for t in range(10)], budget)
        assert sum(picks) == k  # exactly k cheap steps: rounding never forces an extra one


def test_adaptive_curve_interpolates_linear_stretches():
    calls = []

    def measure(t):
        calls.append(t)
        return 10.0 if t == 0 else 1.0 + 0.1 * t

    curve = adaptive_curve(20, measure, tolerance=0.05)
    assert len(calls) < 20 and 0 in curve.sampled and 19 in curve.sampled
    assert np.allclose(curve.values[5:], 1.0 + 0.1 * np.arange(5, 20), atol=0.3)


def _calibrate(build_dir, costs, *extra, seeds="0", own_process=False) -> subprocess.CompletedProcess:
    """`tmpdiff calibrate` on 6 steps and 4 classes: in this process (a fresh one spends ~3.5 s importing), or in its
    own with `own_process`."""
    from tests.cli_helpers import cli_run

    args = ["calibrate", str(build_dir), "--costs", str(costs), "--steps", "6", "--calib-seeds", seeds,
            "--calib-classes", "0,1,2,3", *extra]
    if own_process:
        return subprocess.run([sys.executable, "-m", "tmpdiff.cli", *args], capture_output=True, text=True, timeout=600)
    return cli_run(*args)


@pytest.fixture(scope="module")
def costs_file(quant_build, tmp_path_factory):
    from tmpdiff.engines.profile import profile_build
    from tmpdiff.formats.costs import save_costs

    _, build_dir, _ = quant_build
    path = tmp_path_factory.mktemp("costs") / "costs.json"
    table = profile_build(build_dir, "ort", "cpu", batch=8, warmup=1, repeats=3, precisions=["fp32", "int8"])
    # pin the ratio so the test does not depend on this machine's timings
    table.precisions["int8"].median_ms = 0.7 * table.precisions["fp32"].median_ms
    save_costs(table, path)
    return path


@pytest.fixture(scope="module")
def session6(quant_build, costs_file):
    """The calibration set `_calibrate` uses (6 steps, seed 0, classes 0-3, fp32 vs int8), opened in this process."""
    from tmpdiff.calibration.session import open_session

    _, build_dir, _ = quant_build
    session = open_session(build_dir, costs_file, 6, classes=[0, 1, 2, 3], seeds=[0])
    yield session
    session.evaluator.runner.close()


def _check_measured_speedup(schedule) -> None:
    """measured.speedup is a timing made on this machine, recorded with its inputs."""
    m = schedule.measured
    assert m.repeats == 3 and m.device.startswith("ort, cpu: ") and m.device.endswith("batch 4")
    assert m.reference_ms > 0 and m.schedule_ms > 0
    assert m.speedup == pytest.approx(m.reference_ms / m.schedule_ms, rel=1e-9)


def test_calibrate_writes_a_verified_schedule(quant_build, costs_file, tmp_path):
    from tmpdiff.formats.schedule import load_schedule

    _, build_dir, _ = quant_build
    result = _calibrate(build_dir, costs_file, "--speedup", "1.2", "--out", str(tmp_path / "s.json"),
                        "--report", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    schedule = load_schedule(tmp_path / "s.json")
    assert schedule.steps == 6 and set(schedule.precisions) <= {"fp32", "int8"}
    assert schedule.predicted.speedup >= 1.2 - 1e-6 and schedule.measured.ssim > 0.9
    assert 0 < schedule.evaluations <= 3 * 6 * 2 + 4  # 3 T L (sensitivities + refinement) plus verification
    _check_measured_speedup(schedule)
    assert f"measured speedup {schedule.measured.speedup:.3f}x" in result.stdout
    validation = json.loads((tmp_path / "report" / "validation.json").read_text())
    assert validation["fits"]["all"]["s_down"]["spearman"] > 0.5
    for png in ("sensitivities.png", "score_fit.png", "images.png"):
        assert (tmp_path / "report" / png).stat().st_size > 0


TIMING_FIELDS = ("speedup", "reference_ms", "schedule_ms")  # measured wall times: the one part that varies run to run


def _without_timings(path):
    data = json.loads(path.read_text())
    timings = {k: data["measured"].pop(k) for k in TIMING_FIELDS}
    return data, timings


def test_calibration_with_a_fixed_seed_is_deterministic(quant_build, costs_file, tmp_path):
    """Same engines, costs and seed: identical schedule files (but for the timed speedup) from separate processes;
    another seed draws other noise."""
    from tmpdiff.formats.schedule import load_schedule

    _, build_dir, _ = quant_build
    runs = {name: tmp_path / f"{name}.json" for name in ("seed0", "seed0-again", "seed1")}
    for name, path in runs.items():
        result = _calibrate(build_dir, costs_file, "--speedup", "1.2", "--out", str(path), seeds=name[4],
                            own_process=True)
        assert result.returncode == 0, result.stderr
    (first, first_timing), (again, again_timing) = _without_timings(runs["seed0"]), _without_timings(runs["seed0-again"])
    assert first == again
    assert all(v > 0 for v in (*first_timing.values(), *again_timing.values()))
    first, other = load_schedule(runs["seed0"]), load_schedule(runs["seed1"])
    assert "int8" in first.precisions and first.measured.error > 0  # a mixed schedule, so the error depends on the noise
    assert other.measured.error != first.measured.error


@pytest.mark.parametrize(("extra", "message"), [
    (["--speedup", "3"], "out of reach"),
    (["--speedup", "1.1", "--min-ssim", "0.9"], "exactly one target"),
    (["--max-error", "0.1", "--metric", "lpips"], "unknown metric"),
    (["--speedup", "1.1", "--calib-seeds", ""], "calibration set is empty"),
    (["--min-ssim", "0.99", "--method", "bisection"], "--method bisection searches a speedup target"),
    (["--speedup", "1.1", "--method", "greedy"], "unknown method 'greedy'"),
])
def test_calibrate_bad_targets_fail_before_searching(quant_build, costs_file, tmp_path, extra, message):
    _, build_dir, _ = quant_build
    result = _calibrate(build_dir, costs_file, *extra, "--out", str(tmp_path / "s.json"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.json").exists()


CHOSEN = [999, 870, 640, 455, 260, 95]  # 6 steps, not the scheduler's own 6-step spacing


def _tmpq_plan(path, timesteps=CHOSEN, model_id="tiny-dit", scheduler=None) -> None:
    """A TMPQ-DM plan with one uniform configuration: only its timesteps (model, solver) matter to `--timesteps-from`."""
    from tmpdiff.formats.tmpq_plan import TmpqPlan, save_tmpq_plan

    save_tmpq_plan(TmpqPlan(model_id=model_id, steps=len(timesteps), timesteps=timesteps, scheduler=scheduler,
                            layers=["blocks.0"], configs=[["fp32"]], step_configs=[0] * len(timesteps)), path)


def test_calibrate_over_a_plans_timesteps(quant_build, costs_file, session6, tmp_path):
    """TMPDiff over TMPQ-DM's timesteps: every schedule samples at the plan's timesteps and the written schedule
    names them; its recorded error is what the same schedule scores at those timesteps, not at the own spacing."""
    from tmpdiff.calibration.session import open_session
    from tmpdiff.formats.schedule import SCHEDULE_FORMAT, load_schedule

    _, build_dir, _ = quant_build
    _tmpq_plan(tmp_path / "plan.json")
    result = _calibrate(build_dir, costs_file, "--speedup", "1.2", "--timesteps-from", str(tmp_path / "plan.json"),
                        "--out", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    schedule = load_schedule(tmp_path / "s.json")
    assert schedule.timesteps == CHOSEN and schedule.format == SCHEDULE_FORMAT and f"at timesteps {CHOSEN}" in result.stdout
    assert "int8" in schedule.precisions and schedule.predicted.speedup >= 1.2 - 1e-6
    chosen = open_session(build_dir, costs_file, 6, classes=[0, 1, 2, 3], seeds=[0], timesteps=CHOSEN)
    try:
        at_chosen = chosen.evaluator.evaluate(schedule.precisions)
    finally:
        chosen.evaluator.close()
    assert schedule.measured.latent_error == pytest.approx(at_chosen.latent_error, rel=1e-5)
    assert session6.evaluator.evaluate(schedule.precisions).latent_error != pytest.approx(at_chosen.latent_error, rel=1e-3)


@pytest.mark.parametrize(("source", "message"), [
    ("schedule", "names no timesteps"),
    ("five", "names 5 timesteps but --steps is 6"),
    ("other-model", "the plan is for model 'pixart', this build is 'tiny-dit'"),
    ("other-solver", "its timesteps were chosen for DDIMScheduler, this build samples with DPMSolverMultistepScheduler"),
    ("other-noise", "has another noise process than this build's (beta_schedule: 'linear'"),
    ("outside", "timestep 1500 is outside DPMSolverMultistepScheduler's training timesteps 0..999"),
])
def test_calibrate_refuses_timesteps_it_cannot_use(quant_build, costs_file, tmp_path, source, message):
    from tmpdiff.formats.manifest import load_manifest
    from tmpdiff.formats.schedule import Schedule, SchedulerRef, save_schedule

    _, build_dir, _ = quant_build
    path = tmp_path / "from.json"
    if source == "schedule":
        save_schedule(Schedule(steps=6, precisions=["fp32"] * 6), path)
    elif source == "other-solver":
        ddim = SchedulerRef(class_name="DDIMScheduler", config=load_manifest(build_dir).sampling.scheduler_config)
        _tmpq_plan(path, scheduler=ddim)
    elif source == "other-noise":  # the build's solver class, another noise process: other timesteps
        sampling = load_manifest(build_dir).sampling
        _tmpq_plan(path, scheduler=SchedulerRef(class_name=sampling.scheduler_class,
                                                config=sampling.scheduler_config | {"beta_schedule": "linear"}))
    elif source == "outside":
        _tmpq_plan(path, [1500, *CHOSEN[1:]])
    else:
        _tmpq_plan(path, CHOSEN[:5] if source == "five" else CHOSEN, "pixart" if source == "other-model" else "tiny-dit")
    result = _calibrate(build_dir, costs_file, "--speedup", "1.2", "--timesteps-from", str(path),
                        "--out", str(tmp_path / "s.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith(f"error: {path}") and message in result.stderr, result.stderr
    assert not (tmp_path / "s.json").exists()


def test_costs_for_precisions_not_built_are_refused(quant_build, costs_file, tmp_path):
    _, build_dir, _ = quant_build
    data = json.loads(costs_file.read_text())
    data["precisions"]["int8-sq"] = data["precisions"]["int8"]
    (tmp_path / "c.json").write_text(json.dumps(data))
    result = _calibrate(build_dir, tmp_path / "c.json", "--speedup", "1.1")
    assert result.returncode == 2 and "not exported here: int8-sq" in result.stderr


def test_evaluator_rejects_wrong_length(quant_build, costs_file):
    from tmpdiff.calibration.session import open_session

    _, build_dir, _ = quant_build
    session = open_session(build_dir, costs_file, 4, classes=[0, 1], seeds=[0])
    with pytest.raises(TmpdiffError, match="schedule of 3 steps"):
        session.evaluator.evaluate(["fp32"] * 3)


def test_a_schedule_run_ahead_counts_once_a_search_asks_for_it():
    """The fan-out promise: with any number of workers a search counts the same evaluations, so a schedule the pool ran
    ahead (prefetched) is counted when it is first asked for, and one never asked for is not counted at all."""
    import torch

    from tmpdiff.calibration.evaluator import Evaluator
    from tmpdiff.formats.manifest import SamplingInfo

    class Pool:  # what the evaluator needs of a `fanout.RaySamplePool`: deterministic latents (no fallback) per schedule
        width = 2

        def __init__(self):
            self.ran: list[tuple[str, ...]] = []

        def map(self, schedules):
            self.ran += [tuple(s) for s in schedules]
            return [(torch.full((1, 1, 8, 8), 1.0 + 0.1 * s.count("int8")), 0) for s in schedules]

    sampling = SamplingInfo(scheduler_class="DDIMScheduler", scheduler_config={}, num_classes=1, null_class=1,
                            image_size=8, channels=1, default_steps=2, guidance_scale=1.0)
    pool = Pool()
    ev = Evaluator(runner=None, sampling=sampling, classes=[0], seeds=[0], reference="fp32", steps=2, pool=pool,
                   memo=None)
    ahead = [("fp32", "int8"), ("int8", "fp32"), ("int8", "int8")]
    ev.prefetch(ahead)
    assert pool.ran[1:] == ahead and ev.runs == 0 and ev.prefetched == set(ahead)
    assert ev.evaluate(("int8", "fp32")).latent_error == pytest.approx(0.01)
    assert ev.runs == 1 and ev.prefetched == {("fp32", "int8"), ("int8", "int8")}
    ev.evaluate(("int8", "fp32"))  # asked again: the cache's, counted once
    ev.evaluate(("fp32", "fp32"))  # the reference is never counted
    assert ev.runs == 1 and len(pool.ran) == 4
    ev.evaluate(("int8", "int8"))
    assert ev.runs == 2 and ev.prefetched == {("fp32", "int8")}  # ran on the pool, never asked for: not counted


def test_evaluations_reuse_shared_prefixes_exactly(quant_build, costs_file):
    from tmpdiff.calibration.session import open_session

    _, build_dir, _ = quant_build
    session = open_session(build_dir, costs_file, 6, classes=[0, 1], seeds=[0])
    ev = session.evaluator
    try:
        hits, misses = ev.memo.hits, ev.memo.misses  # the reference's 6 calls
        ev.evaluate(["fp32", "fp32", "int8", "int8", "fp32", "int8"])
        later = ["fp32", "fp32", "int8", "fp32", "int8", "int8"]
        judged = ev.evaluate(later)
        # the first shares the reference's first 2 calls, the second the first's first 3
        assert (ev.memo.hits - hits, ev.memo.misses - misses) == (2 + 3, 4 + 3)
        # counted by the engine that ran: the reference's 6, then steps 2-5 (i8 i8 F i8), then steps 3-5 (F i8 i8)
        assert ev.memo.counts()["run_by_engine"] == {"fp32": 6 + 1 + 1, "int8": 3 + 2}
        assert ev.memo.summary() == f"{ev.memo.misses} run (8 fp32, 5 int8), {ev.memo.hits} reused"
        assert ev.runner.call_memo is None  # attached only while an evaluation runs
        ev.memo = None
        ev.cache.clear()
        assert ev.evaluate(later) == judged  # exactly what the engines give run from scratch
    finally:
        ev.close()


def test_calibrate_bisection_meets_the_target(quant_build, costs_file, session6, tmp_path):
    from tmpdiff.formats.schedule import load_schedule

    _, build_dir, _ = quant_build
    result = _calibrate(build_dir, costs_file, "--speedup", "1.2", "--method", "bisection", "--out", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    schedule = load_schedule(tmp_path / "s.json")
    problem = session6.problem
    assert schedule.target["method"] == "bisection" and set(schedule.precisions) <= {"fp32", "int8"}
    assert schedule.predicted.speedup == pytest.approx(problem.speedup(schedule.precisions), rel=1e-12)
    assert schedule.predicted.speedup >= 1.2 - 1e-9
    # the file's measured error is the real one, and no worse than lowering every step
    assert schedule.measured.error == pytest.approx(problem.error(schedule.precisions), rel=1e-6)
    assert schedule.measured.error <= problem.error(["int8"] * 6)
    _check_measured_speedup(schedule)


@pytest.mark.parametrize("floor", ["--min-ssim", "--max-error"])
def test_calibrate_meets_a_quality_floor_with_cheap_steps(quant_build, costs_file, session6, tmp_path, floor):
    from tmpdiff.formats.schedule import load_schedule

    _, build_dir, _ = quant_build
    problem = session6.problem
    cheap = problem.evaluate(["int8"] * 6)
    if floor == "--min-ssim":  # halfway between the all-int8 schedule and the reference (SSIM 1)
        value = (cheap.ssim + 1.0) / 2

        def passes(e):
            return e.ssim >= value
    else:
        value = cheap.latent_error / 2

        def passes(e):
            return e.latent_error <= value
    singles = [["int8" if i == t else "fp32" for i in range(6)] for t in range(6)]
    assert not passes(cheap) and any(passes(problem.evaluate(z)) for z in singles)  # the floor admits cheap steps
    result = _calibrate(build_dir, costs_file, floor, repr(value), "--out", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    schedule = load_schedule(tmp_path / "s.json")
    assert schedule.target[floor[2:].replace("-", "_")] == value
    evaluation = problem.evaluate(schedule.precisions)
    assert passes(evaluation)
    assert schedule.measured.ssim == pytest.approx(evaluation.ssim, rel=1e-9)
    assert schedule.measured.latent_error == pytest.approx(evaluation.latent_error, rel=1e-6)
    assert "int8" in schedule.precisions and schedule.predicted.speedup > 1  # not the trivial all-fp32 answer
    _check_measured_speedup(schedule)


def _synthetic_problem(steps: int = 6, seed: int = 7):
    """fp32/int8 over `steps` steps: error = per-step weights of the int8 steps + a term per adjacent int8 pair."""
    from tmpdiff.calibration.evaluator import Evaluation
    from tmpdiff.calibration.search import Problem

    rng = np.random.default_rng(seed)
    weight, pair = rng.uniform(0.1, 1.0, steps), rng.uniform(-0.1, 0.6, steps - 1)

    def error(schedule) -> float:
        cheap = np.array([p == "int8" for p in schedule], dtype=float)
        return float(weight @ cheap + pair @ (cheap[:-1] * cheap[1:]))

    calls: list[tuple[str, ...]] = []

    def evaluate(schedule):
        calls.append(tuple(schedule))
        return Evaluation(tuple(schedule), error(schedule), 1.0 - error(schedule) / 10, float("inf"))

    return Problem.create(steps, "fp32", {"fp32": 1.0, "int8": 0.7}, "latent", evaluate), error, calls


def test_exhaustive_and_evolutionary_on_a_synthetic_problem():
    from tmpdiff.calibration.baselines import evolutionary, exhaustive_two_level

    problem, error, calls = _synthetic_problem()
    everything = {z: error(z) for z in itertools.product(("fp32", "int8"), repeat=6)}
    best = exhaustive_two_level(problem, "int8")
    assert len(set(calls)) == 64 and sorted(best) == list(range(7))
    for k, (schedule, value) in best.items():
        assert schedule.count("int8") == k
        assert value == min(v for z, v in everything.items() if z.count("int8") == k)
    budget = problem.budget_for_speedup(1.2)  # at least 4 of the 6 steps in int8
    optimum = min(v for z, v in everything.items() if problem.schedule_cost(z) <= budget)
    assert min(v for z, v in best.values() if problem.schedule_cost(z) <= budget) == optimum
    for seed in range(5):
        calls.clear()
        schedule = evolutionary(problem, budget, 12, seed=seed)
        assert len(calls) <= 12 and schedule in calls  # within its evaluation budget, returns something it measured
        assert problem.schedule_cost(schedule) <= budget and everything[schedule] >= optimum


def test_exhaustive_and_evolutionary_on_the_bundled_engines(session6):
    from tmpdiff.calibration.baselines import evolutionary, exhaustive_two_level
    from tmpdiff.calibration.search import Problem

    base = session6.problem
    calls: list[tuple[str, ...]] = []

    def evaluate(schedule):
        calls.append(tuple(schedule))
        return base.evaluate(schedule)

    problem = Problem(base.steps, base.reference, base.levels, base.cost, base.metric, evaluate)
    best = exhaustive_two_level(problem, "int8")
    assert len(set(calls)) == 64
    budget = problem.budget_for_speedup(1.2)
    everything = {z: base.error(z) for z in itertools.product(("fp32", "int8"), repeat=6)}
    optimum = min((z for z in everything if problem.schedule_cost(z) <= budget), key=everything.get)
    found, found_error = min((v for v in best.values() if problem.schedule_cost(v[0]) <= budget), key=lambda v: v[1])
    assert found == optimum and found_error == everything[optimum] > 0
    calls.clear()
    schedule = evolutionary(problem, budget, 16, seed=0)
    assert len(calls) <= 16 and problem.schedule_cost(schedule) <= budget
    assert everything[schedule] >= found_error


def test_bench_compares_tmpdiff_with_every_baseline(quant_build, costs_file, tmp_path):
    import torch

    from tests.cli_helpers import cli
    from tmpdiff.calibration.baselines import HEURISTICS
    from tmpdiff.formats.manifest import load_manifest

    _, build_dir, _ = quant_build
    out = tmp_path / "bench"
    code, _, err = cli("bench", build_dir, "--costs", costs_file, "--out", out, "--steps", "4", "--speedups", "1.1",
                       "--calib-seeds", "0")
    assert code == 0, err
    (run,) = json.loads((out / "bench.json").read_text())["runs"]
    assert run["steps"] == 4 and [t["speedup"] for t in run["targets"]] == [1.1]
    rows = {r["method"]: r for r in run["targets"][0]["rows"]}
    assert set(rows) == {f"{m} ({metric})" for m in ("TMPDiff", "TMPDiff refined", "bisection", "evolutionary")
                         for metric in ("latent", "ssim")} | set(HEURISTICS)
    assert all(r["speedup"] >= 1.1 - 1e-9 for r in rows.values())  # every method within the budget
    for metric, key in (("latent", "latent_error"), ("ssim", "one_minus_ssim")):
        ours = rows[f"TMPDiff ({metric})"]
        for heuristic in ("cheap first", "cheap last"):
            assert ours["cheap_steps"] == rows[heuristic]["cheap_steps"]  # two levels: the same cost
            assert ours[key] <= rows[heuristic][key]
    # the exhaustive judge: nothing beats the optimum with as many cheap steps
    assert {r["k"] for r in run["exhaustive"]} == {1, 2, 3}
    for r in run["exhaustive"]:
        assert r["optimum"] <= min(r["tmpdiff"], *(r[h] for h in HEURISTICS))
    # refinement never loses to its knapsack start; every row is judged on unseen seeds too
    for metric, key in (("latent", "latent_error"), ("ssim", "one_minus_ssim")):
        assert rows[f"TMPDiff refined ({metric})"][key] <= rows[f"TMPDiff ({metric})"][key]
    assert all("latent" in r["unseen"] and r["unseen"]["latent"]["low"] <= r["unseen"]["latent"]["value"]
               for r in rows.values())
    assert {r["budget_label"] for r in run["exhaustive_unseen"]["rows"]} == {"K=1", "K=2", "K=3"}
    # honest engines never fell back, and every row says so on both sample sets
    assert all(r["fallbacks"] == {"calib": 0, "unseen": 0} for r in [*rows.values(), *run["uniform"]])
    assert run["exhaustive_unseen"]["fell_back_schedules"] == 0
    assert run["targets"][0]["measured_speedup_tmpdiff_ssim"] > 0
    calls = run["calibration_engine_calls"]
    assert sum(calls["run_by_engine"].values()) == calls["run"] and set(calls["run_by_engine"]) <= {"fp32", "int8"}
    # progress lines carry the time elapsed since the bench began, the engine calls line its per-engine counts
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert progress and all(re.match(r"\[ +\d+:[0-5]\d\] T=4: ", line) for line in progress), err
    assert any(f"calibration engine calls {calls['run']} run (" in line for line in progress), err
    md = (out / "bench.md").read_text()
    assert "| TMPDiff (latent) |" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what made the engines it judged: each level's graph, its calibration's host and its engine, and this host
    made = json.loads((out / "bench.json").read_text())["build_provenance"]
    manifest = load_manifest(build_dir)
    assert set(made["precisions"]) == set(run["levels"]) == {"fp32", "int8"}
    int8 = made["precisions"]["int8"]
    assert int8["onnx_sha256"] == manifest.precisions["int8"].sha256
    assert int8["engine"]["sha256"] == manifest.engines["ort:cpu:int8"].sha256
    kernels = torch.backends.cpu.get_cpu_capability()
    assert int8["calibration_captured_on"]["kernels"] == made["host"]["torch_kernels"] == kernels
    assert made["precisions"]["fp32"]["calibration_captured_on"] is None  # nothing calibrated
    assert f"({kernels} kernels)" in md and made["host"]["device"] in md


def test_bench_refuses_bad_arguments_before_making_its_folder(quant_build, costs_file, tmp_path):
    """--out was created before the arguments were checked: a refused bench left an empty folder behind; a step
    count refused only after the earlier ones' whole comparison."""
    from tests.cli_helpers import cli

    _, build_dir, _ = quant_build
    for i, extra in enumerate([("--steps", "0"), ("--steps", "10,1"), ("--steps", "4", "--reference", "fp16")]):
        out = tmp_path / f"bench{i}"
        code, _, err = cli("bench", build_dir, "--costs", costs_file, "--out", out, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert not out.exists(), extra


def test_bench_walks_three_levels_when_asked(quant_build, tmp_path):
    from tests.cli_helpers import cli
    from tmpdiff.calibration.lossy import halving_sizes

    _, build_dir, _ = quant_build
    costs = tmp_path / "gpu.json"
    code, _, err = cli("costs", "--device", "test GPU", "--ratio", "fp32=1,int8=0.6,int4=0.45", "--source", "test",
                       "--out", costs)
    assert code == 0, err
    args = ["bench", build_dir, "--costs", costs, "--steps", "3", "--speedups", "1.2,1.6,9", "--calib-seeds", "0"]
    code, _, err = cli(*args, "--exhaustive-levels", "int8,int4", "--out", tmp_path / "refused")
    assert code == 2 and "must hold the reference fp32" in err, err
    code, _, err = cli(*args, "--exhaustive-levels", "fp32,fp8", "--out", tmp_path / "refused2")
    assert code == 2 and "fp8 not among the compared levels" in err, err
    # a walk asked for by name that cannot happen is refused before any work (was: skipped in silence)
    code, _, err = cli(*args[:4], "--steps", "9", "--exhaustive-levels", "fp32,int8,int4", "--out", tmp_path / "r3")
    assert code == 2 and "3^9 = 19,683 schedules at --steps 9, over the 6,561" in err, err
    code, _, err = cli(*args, "--exhaustive-levels", "fp32,int4", "--no-exhaustive", "--out", tmp_path / "r4")
    assert code == 2 and "drop --no-exhaustive" in err, err
    code, _, err = cli(*args, "--exhaustive-levels", "int4,fp32,int8", "--out", tmp_path / "bench")
    assert code == 0, err
    (run,) = json.loads((tmp_path / "bench" / "bench.json").read_text())["runs"]
    assert run["skipped_speedups"] == [9.0] and "skipped: [9.0]" in err  # out of reach: said and recorded
    ex = run["exhaustive_unseen"]
    assert ex["levels"] == ["fp32", "int8", "int4"] and ex["schedules"] == 27
    assert ex["step_evaluations"] == 2 * (3 + 9 + 27)  # two seed groups (calibration, unseen), each tree node once
    # budgets at the reachable speedups (int4 everywhere is 2.22x); no K-based table for three levels
    assert {r["budget_label"] for r in ex["rows"]} == {"1.2x", "1.6x"} and "exhaustive" not in run
    for r in ex["rows"]:
        refined = r["methods"]["TMPDiff refined"]
        assert refined["calib_ratio"] >= 1 - 1e-12 and refined["unseen"]["ratio_to_optimum"]["value"] >= 1 - 1e-12
    assert set(ex["selection_floor"]["summary"]) == {"latent", "ssim"}
    # the calibration-size curve: halvings of the calibration set, each searched and judged on the unseen samples
    curve = ex["size_curve"]
    assert [p["samples"] for p in curve["points"]] == halving_sizes(ex["calib_samples"])
    assert (curve["pool_samples"], curve["unseen_samples"]) == (ex["calib_samples"], ex["unseen_samples"])
    assert len(curve["points"][-1]["runs"]) == 1  # the whole set is one draw
    assert all(min(run["ratios"]) >= 1 - 1e-12 for p in curve["points"] for run in p["runs"])
    # ... and over random halvings of every calibration and unseen sample, beside the calibration set's optimum
    split = ex["split_curve"]
    total = ex["calib_samples"] + ex["unseen_samples"]
    assert (split["samples"], split["unseen_samples"]) == (total, total // 2)
    assert split["sizes"] == halving_sizes(total // 2, smallest=min(4, total // 2))
    assert all(min(min(r) for r in sizes) >= 1 - 1e-12 for m in split["metrics"].values()
               for sizes in m["refined"] + m["calib_optimum"])
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "## (exhaustive) T = 3, levels fp32, int8, int4: all 27 schedules" in md
    assert "Calibration set size vs unseen ratio" in md
    assert f"random halvings of all {total} samples" in md


def test_schedule_figures_are_declared_and_old_files_load(tmp_path):
    from pydantic import ValidationError

    from tmpdiff.formats.schedule import Schedule, load_schedule

    # as `tmpdiff calibrate` wrote them before measured.speedup was timed
    old = {"format": "tmpdiff.schedule/1", "steps": 3, "precisions": ["fp32", "int8", "fp32"], "reference": "fp32",
           "target": {"speedup": 1.1, "metric": "latent", "method": "sensitivity"},
           "predicted": {"speedup": 1.12, "error": 1.7e-4, "error_s_up": -5.0e-4},
           "measured": {"speedup": None, "error": 1.2e-4, "latent_error": 1.2e-4, "ssim": 0.9998, "psnr": 49.0},
           "evaluations": 7, "costs": {"source": "cpu: x", "backend": "ort", "batch": 8, "per_step_ms": {"fp32": 1.0}}}
    (tmp_path / "s.json").write_text(json.dumps(old))
    schedule = load_schedule(tmp_path / "s.json")
    assert schedule.predicted.error_s_up == -5.0e-4 and schedule.measured.ssim == 0.9998
    assert schedule.measured.speedup is None and schedule.measured.device is None
    assert Schedule.model_validate({**old, "measured": {**old["measured"], "psnr": None}}).measured.psnr is None
    for field, bad in (("ssim", float("nan")), ("ssim", 1.5), ("psnr", float("inf")), ("latent_error", -1.0),
                       ("speedup", 0.0), ("schedule_ms", float("inf")), ("repeats", 0)):
        with pytest.raises(ValidationError, match=field):
            Schedule.model_validate({**old, "measured": {**old["measured"], field: bad}})


def _weighted_problem(steps: int, costs: dict[str, float]):
    """Error: each cheap step costs its weight (earlier steps more), deeper levels twice as much per level."""
    from tmpdiff.calibration.evaluator import Evaluation
    from tmpdiff.calibration.search import Problem

    def evaluate(schedule):
        order = list(costs)
        error = float(sum((steps - t) * order.index(p) for t, p in enumerate(schedule)))
        return Evaluation(tuple(schedule), error, 1.0 - error / 1e3, float("inf"))

    return Problem.create(steps, "fp32", costs, "latent", evaluate)


def test_a_schedule_costing_exactly_the_budget_fits_every_search():
    """Sums of 0.45 miss K cheap steps' budget by one float rounding (K=8 of 10: 5.6000000000000005 > 5.6): the
    searches compare with the knapsack's tolerance, so they neither lower a step more nor fail at the top speedup."""
    from tmpdiff.calibration.baselines import evolutionary
    from tmpdiff.calibration.search import segment_bisection

    problem = _weighted_problem(10, {"fp32": 1.0, "int4": 0.45})
    eight = ("fp32", "fp32", *["int4"] * 8)
    assert problem.schedule_cost(eight) > 2 + 8 * 0.45 and problem.fits(eight, 2 + 8 * 0.45)
    assert segment_bisection(problem, 5 + 5 * 0.45) == ("fp32",) * 5 + ("int4",) * 5  # was: all ten int4
    top = _weighted_problem(20, {"fp32": 1.0, "fp8": 0.55})
    assert not top.schedule_cost(("fp8",) * 20) <= 20 / top.max_speedup()  # the float sum is over the top's budget
    assert evolutionary(top, 20 / top.max_speedup(), 10) == ("fp8",) * 20  # was: ValueError from an empty choice


def test_a_target_at_the_top_speedup_within_its_tolerance_is_all_cheapest():
    """A target up to 1e-9 above the top speedup passes the target check; its budget fell below all-cheapest's float
    sum (T = 39, int4 at 0.1: 10.00000001x), and the search failed after the sensitivities with 'no schedule fits'."""
    from tmpdiff.calibration.search import measure_sensitivities, tmpdiff_search

    problem = _weighted_problem(39, {"fp32": 1.0, "int4": 0.1})
    speedup = problem.max_speedup() * (1 + 1e-9)
    budget = problem.budget_for_speedup(speedup)
    assert budget == problem.schedule_cost(("int4",) * 39)
    schedule, _ = tmpdiff_search(problem, budget, measure_sensitivities(problem))
    assert schedule == ("int4",) * 39
    with pytest.raises(TmpdiffError, match="out of reach"):
        problem.budget_for_speedup(problem.max_speedup() * (1 + 1e-8))


def test_segment_bisection_keeps_to_its_evaluations():
    """--method bisection had no evaluation bound (151 distinct schedules at T = 10 with 4 levels, past the 3*T*L =
    120 promise) and spent evaluations on a budget only all-cheapest fits."""
    from tmpdiff.calibration.search import CountingProblem, measure_sensitivities, segment_bisection

    costs = {"fp32": 1.0, "int8": 0.6, "fp8": 0.55, "int4": 0.45}
    base = _weighted_problem(10, costs)
    sens = measure_sensitivities(base)
    uncapped = CountingProblem(base)
    segment_bisection(uncapped, base.budget_for_speedup(1.6), sens)
    assert len(uncapped.asked) > 12  # what the cap below cuts
    capped = CountingProblem(base)
    schedule = segment_bisection(capped, base.budget_for_speedup(1.6), sens, max_evaluations=12)
    assert len(capped.asked) <= 12 and base.fits(schedule, base.budget_for_speedup(1.6))
    top = CountingProblem(base)
    assert segment_bisection(top, base.budget_for_speedup(base.max_speedup()), sens) == ("int4",) * 10
    assert top.asked == set()


def test_refinement_with_two_levels_of_one_cost():
    """A stated table may give two cheaper levels the same cost: lowering one to the other saves nothing, so paying
    for a raised step skips it (was: ZeroDivisionError)."""
    from tmpdiff.calibration.refine import refine
    from tmpdiff.calibration.search import measure_sensitivities

    problem = _weighted_problem(4, {"fp32": 1.0, "int8": 0.5, "fp8": 0.5})
    budget = problem.budget_for_speedup(1.5)
    sens = measure_sensitivities(problem)
    start = ("int8", "int8", "int8", "fp32")
    refined = refine(problem, start, budget, 50, sens)
    assert problem.fits(refined.schedule, budget) and problem.error(refined.schedule) <= problem.error(start)


def test_quality_floor_returns_the_cheapest_accepted_schedule(monkeypatch):
    """The budget bisection can accept, at a larger budget, a schedule cheaper than the one it accepts later at a
    smaller budget (`tmpdiff_search` picks the better *measured* of its knapsack answers, so its answer's cost is not
    monotone in the budget): the answer is the cheapest accepted one."""
    from tmpdiff.calibration import floor, search
    from tmpdiff.calibration.evaluator import Evaluation

    def evaluate(schedule):
        e = 0.1 * sum(p != "fp32" for p in schedule)
        return Evaluation(tuple(schedule), e, 1.0 - e, float("inf"))

    problem = search.Problem.create(4, "fp32", {"fp32": 1.0, "int8": 0.6, "int4": 0.45}, "latent", evaluate)
    cheaper = ("int4", "int4", "int8", "int8")  # cost 2.1, answered at budget 2.9
    dearer = ("int8", "int8", "int8", "int4")  # cost 2.25, answered at budget 2.35
    all_int4, refused = ("int4",) * 4, ("int4", "int4", "int4", "int8")  # both refused: at 1.8 and 2.075
    answers = {1.8: all_int4, 2.9: cheaper, 2.35: dearer}

    def scripted(problem, budget, sens):
        answer = next((s for b, s in answers.items() if abs(b - budget) < 1e-6), refused)
        assert problem.fits(answer, budget)
        return answer, [answer]

    monkeypatch.setattr(floor, "tmpdiff_search", scripted)
    # no refinement: the knapsack answers alone (refinement would measure swaps of `refused` that this floor accepts)
    schedule, tried = floor.meet_quality_floor(problem, None, lambda e: e.schedule not in (all_int4, refused),
                                               iterations=3, refine_evaluations=0)
    assert tried == [all_int4, cheaper, dearer, refused]
    assert schedule == cheaper  # the last accepted (dearer) was returned before


def test_a_two_step_report_has_no_fit_and_is_written_whole(quant_build, costs_file, tmp_path):
    """At 2 steps too few held-out schedules differ to fit the scores: the fits are null ("n/a" in the report), where
    NaN made validation.json unwritable after the schedule and the plots were written."""
    from tests.cli_helpers import cli

    _, build_dir, _ = quant_build
    report = tmp_path / "report"
    code, _, err = cli("calibrate", build_dir, "--costs", costs_file, "--speedup", "1.1", "--steps", "2",
                       "--calib-seeds", "0", "--calib-classes", "0,1", "--out", tmp_path / "s.json", "--report", report)
    assert code == 0, err
    fits = json.loads((report / "validation.json").read_text())["fits"]
    assert any(fit["r2"] is None for by_score in fits.values() for fit in by_score.values())
    assert "| n/a |" in (report / "calibration_report.md").read_text()
