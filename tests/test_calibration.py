"""Calibration: the knapsack is exact, sensitivities sample adaptively, the CLI refuses bad targets early."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from tmpdiff.calibration.knapsack import solve_mckp
from tmpdiff.calibration.sensitivity import adaptive_curve
from tmpdiff.formats.errors import TmpdiffError


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    steps, levels = 6, 3
    costs = [sorted(rng.uniform(1, 3, levels), reverse=True) for _ in range(steps)]
    scores = [[0.0, *sorted(rng.uniform(0, 1, levels - 1))] for _ in range(steps)]
    budget = float(rng.uniform(sum(min(r) for r in costs), sum(max(r) for r in costs)))
    picks = solve_mckp(costs, scores, budget)
    assert sum(costs[t][i] for t, i in enumerate(picks)) <= budget + 1e-9
    best = min(sum(scores[t][i] for t, i in enumerate(c)) for c in itertools.product(range(levels), repeat=steps)
               if sum(costs[t][i] for t, i in enumerate(c)) <= budget)
    # exact up to the cost discretisation (2000 units of the budget)
    assert sum(scores[t][i] for t, i in enumerate(picks)) <= best + 1e-9 or budget - sum(
        costs[t][i] for t, i in enumerate(picks)) < 0.01 * budget


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


def _calibrate(build_dir, costs, *extra, seeds="0"):
    return subprocess.run([sys.executable, "-m", "tmpdiff.cli", "calibrate", str(build_dir), "--costs", str(costs),
                           "--steps", "6", "--calib-seeds", seeds, "--calib-classes", "0,1,2,3", *extra],
                          capture_output=True, text=True, timeout=600)


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


def test_calibrate_writes_a_verified_schedule(quant_build, costs_file, tmp_path):
    from tmpdiff.formats.schedule import load_schedule

    _, build_dir, _ = quant_build
    result = _calibrate(build_dir, costs_file, "--speedup", "1.2", "--out", str(tmp_path / "s.json"),
                        "--report", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    schedule = load_schedule(tmp_path / "s.json")
    assert schedule.steps == 6 and set(schedule.precisions) <= {"fp32", "int8"}
    assert schedule.predicted.speedup >= 1.2 - 1e-6 and schedule.measured.ssim > 0.9
    assert 0 < schedule.evaluations <= 2 * 6 * 1 + 4  # 2 T L plus verification
    validation = json.loads((tmp_path / "report" / "validation.json").read_text())
    assert validation["fits"]["all"]["s_down"]["spearman"] > 0.5
    for png in ("sensitivities.png", "score_fit.png", "images.png"):
        assert (tmp_path / "report" / png).stat().st_size > 0


def test_calibration_with_a_fixed_seed_is_deterministic(quant_build, costs_file, tmp_path):
    """Same engines, costs and seed: byte-identical schedule files from separate processes; another seed draws other noise."""
    from tmpdiff.formats.schedule import load_schedule

    _, build_dir, _ = quant_build
    runs = {name: tmp_path / f"{name}.json" for name in ("seed0", "seed0-again", "seed1")}
    for name, path in runs.items():
        result = _calibrate(build_dir, costs_file, "--speedup", "1.2", "--out", str(path), seeds=name[4])
        assert result.returncode == 0, result.stderr
    assert runs["seed0"].read_bytes() == runs["seed0-again"].read_bytes()
    first, other = load_schedule(runs["seed0"]), load_schedule(runs["seed1"])
    assert "int8" in first.precisions and first.measured.error > 0  # a mixed schedule, so the error depends on the noise
    assert other.measured.error != first.measured.error


@pytest.mark.parametrize(("extra", "message"), [
    (["--speedup", "3"], "out of reach"),
    (["--speedup", "1.1", "--min-ssim", "0.9"], "exactly one target"),
    (["--max-error", "0.1", "--metric", "lpips"], "unknown metric"),
    (["--speedup", "1.1", "--calib-seeds", ""], "calibration set is empty"),
])
def test_calibrate_bad_targets_fail_before_searching(quant_build, costs_file, tmp_path, extra, message):
    _, build_dir, _ = quant_build
    result = _calibrate(build_dir, costs_file, *extra, "--out", str(tmp_path / "s.json"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
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
