"""Choice rules on the calibration samples judged on unseen ones (`calibration/selection_rules.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_split_curve import COST, _table
from tmpdiff.calibration.selection_rules import RULES, selection_rules_curve
from tmpdiff.calibration.split_curve import split_size_curve


def test_the_mean_rule_is_the_calibration_optimum_of_the_split_curve():
    table = _table(noise=0.5)
    rules = selection_rules_curve(table, np.arange(12), COST, "fp32", [2, 6], splits=4, seed=3)
    split = split_size_curve(table, np.arange(12), COST, "fp32", [2, 6], splits=4, seed=3)
    for metric in ("latent", "ssim"):
        mean = np.array(rules["metrics"][metric]["ratios"])[rules["rules"].index("mean")]  # sizes x splits x budgets
        assert mean == pytest.approx(np.array(split["metrics"][metric]["calib_optimum"]))
        assert mean.max() > 1.0  # with sample noise the choice misses the unseen optimum somewhere


def test_without_sample_noise_every_rule_picks_the_unseen_optimum():
    table = _table(noise=0.0)
    curve = selection_rules_curve(table, np.arange(12), COST, "fp32", [3], splits=3)
    for d in curve["metrics"].values():
        assert np.allclose(d["ratios"], 1.0)
        assert {p["rule"] for p in d["points"]} == set(RULES)
        assert all(p["splits_within_goal"] == 1.0 for p in d["points"])


def test_a_heavy_tailed_sample_misleads_the_mean_and_not_the_median():
    """One calibration sample whose errors rank the schedules backwards outweighs the rest in a mean only."""
    table = _table(noise=0.0, samples=12)
    errors = table.metrics["latent"]
    errors[:, 0] = 1e3 * (errors[:, 0].max() - errors[:, 0] + 1.0)  # sample 0: reversed and huge
    picks = {name: rule(errors[:, :6]) for name, rule in RULES.items()}
    assert int(np.argmin(picks["median"])) == int(np.argmin(errors[:, 1:6].mean(axis=1)))
    assert int(np.argmin(picks["mean"])) != int(np.argmin(errors[:, 1:6].mean(axis=1)))
