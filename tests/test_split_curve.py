"""The calibration-size curve over random halvings of a table's samples (`calibration/split_curve.py`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import tmpdiff.calibration.split_curve as split_curve
from tmpdiff.calibration.exhaustive import SampleTable
from tmpdiff.formats.errors import TmpdiffError

COST = {"fp32": 1.0, "int4": 0.45}


def _table(noise: float, samples: int = 12, steps: int = 4, seed: int = 0) -> SampleTable:
    """fp32/int4 schedules whose error grows with the int4 steps (early steps dearer) plus per-sample noise."""
    rng = np.random.default_rng(seed)
    schedules = list(itertools.product(["fp32", "int4"], repeat=steps))
    weight = np.linspace(2.0, 1.0, steps)
    base = np.array([sum(w for w, p in zip(weight, s, strict=True) if p == "int4") for s in schedules])
    values = base[:, None] * (1 + noise * rng.standard_normal((len(schedules), samples))) ** 2 + 1e-3
    metrics = {"latent": values, "one_minus_ssim": values * 0.1, "psnr": 40.0 - 10.0 * np.log10(values)}
    return SampleTable(steps, ["fp32", "int4"], seeds=[i // 3 for i in range(samples)],
                       labels=[i % 3 for i in range(samples)], metrics=metrics)


def test_without_sample_noise_the_calibration_optimum_is_the_unseen_one():
    table = _table(noise=0.0)
    curve = split_curve.split_size_curve(table, np.arange(12), COST, "fp32", [2, 6], splits=3)
    for d in curve["metrics"].values():
        assert np.allclose(d["calib_optimum"], 1.0)
        assert np.min(d["refined"]) >= 1 - 1e-9
        assert all(p["calib_optimum_splits_within_goal"] == 1.0 for p in d["points"])


def test_ratios_are_to_the_unseen_halfs_own_optimum():
    table = _table(noise=0.5)
    curve = split_curve.split_size_curve(table, np.arange(12), COST, "fp32", [1, 3, 6], splits=5, seed=1)
    for d in curve["metrics"].values():
        ratios = np.array(d["refined"] + d["calib_optimum"])
        assert ratios.min() >= 1 - 1e-9  # nothing chosen on other samples beats the unseen optimum there
        assert ratios.max() > 1.0  # with sample noise some choice must miss it
        worst = np.array(d["calib_optimum"]).max(axis=2).mean(axis=1)  # sizes x splits x budgets
        assert [p["calib_optimum_mean_worst_budget"] for p in d["points"]] == pytest.approx(worst.tolist())


def test_calibration_sets_are_nested_prefixes_of_one_half_and_never_unseen(monkeypatch):
    table = _table(noise=0.3, samples=10)
    searched, judged = _recording(monkeypatch, split_curve)
    split_curve.split_size_curve(table, np.arange(10), COST, "fp32", [2, 5], splits=2, metrics=("latent",))
    unseen_sets = {tuple(s) for s in judged if len(s) == 5 and not any(np.array_equal(s, c) for c in searched)}
    assert len(unseen_sets) == 2  # one unseen half per halving
    for calib in searched:
        assert len(calib) in (2, 5)
        own = [u for u in unseen_sets if not set(calib) & set(u)]
        assert own, f"calibration samples {calib} overlap every unseen half"
        if len(calib) == 5:  # the largest set is the whole other half
            assert any(set(calib) | set(u) == set(range(10)) for u in own)
    fives = [set(c) for c in searched if len(c) == 5]
    twos = [set(c) for c in searched if len(c) == 2]
    assert all(any(t <= f for f in fives) for t in twos)  # the small set is drawn from the same half as the large
    assert len({frozenset(t) for t in twos}) == 2  # one set per halving and size, the same at every budget


def test_sizes_beyond_half_the_samples_are_refused():
    with pytest.raises(TmpdiffError, match="half of 12 samples"):
        split_curve.split_size_curve(_table(noise=0.1), np.arange(12), COST, "fp32", [4, 7])


def test_the_size_curve_refuses_a_pool_that_overlaps_its_unseen_samples():
    """Its ratios are judged on unseen samples: a pool sharing one of them would judge a schedule on what it was
    calibrated on (the exhaustive comparison refused that; the size curve did not check)."""
    from tmpdiff.calibration.lossy import size_curve

    table = _table(noise=0.1)  # seeds 0..3, three samples each
    assert size_curve(table, [0, 1], [3], COST, "fp32", [3], draws=1)["points"]
    with pytest.raises(TmpdiffError, match="calibration and unseen samples overlap"):
        size_curve(table, [0, 1], [1, 3], COST, "fp32", [3], draws=1)


def _prompts_table(prompts: int = 8, seeds: int = 2, steps: int = 3) -> SampleTable:
    """`_table`'s schedules on prompts x seeds: a sample's label is its prompt (seed-major order, as a walk per seed)."""
    table = _table(noise=0.3, samples=prompts * seeds, steps=steps)
    table.seeds = [s for s in range(seeds) for _ in range(prompts)]
    table.labels = [p for _ in range(seeds) for p in range(prompts)]
    return table


def _recording(monkeypatch, module) -> tuple[list, list]:
    """Record the calibration sets searched and the sample sets optima are taken on."""
    from tmpdiff.calibration.exhaustive import optimum as real_optimum
    from tmpdiff.calibration.lossy import search_on_table as real_search

    searched, judged = [], []

    def search(table_, calib, *args, **kwargs):
        searched.append(np.asarray(calib).copy())
        return real_search(table_, calib, *args, **kwargs)

    def best(table_, name, samples, *args, **kwargs):
        judged.append(np.asarray(samples).copy())
        return real_optimum(table_, name, samples, *args, **kwargs)

    if hasattr(module, "search_on_table"):
        monkeypatch.setattr(module, "search_on_table", search)
    monkeypatch.setattr(module, "optimum", best)
    return searched, judged


def test_halvings_of_prompts_x_seeds_split_prompts(monkeypatch):
    """Samples of prompts x seeds: every seed of a prompt lands in one half, calibration sets are whole prompts."""
    table = _prompts_table()
    labels = np.asarray(table.labels)
    searched, judged = _recording(monkeypatch, split_curve)
    curve = split_curve.split_size_curve(table, np.arange(16), COST, "fp32", [4, 8], splits=3, metrics=("latent",),
                                         sample_unit="prompts")
    assert curve["split_unit"] == "prompts" and curve["unseen_samples"] == 8
    unseen_sets = [s for s in judged if not any(np.array_equal(s, c) for c in searched)]
    assert unseen_sets and searched
    for calib in searched:
        assert len(calib) in (4, 8)
        assert all((labels[calib] == p).sum() == 2 for p in set(labels[calib]))  # whole prompts, both seeds
        assert any(not set(labels[calib]) & set(labels[u]) for u in unseen_sets)  # prompts apart from its unseen half
    for unseen in unseen_sets:
        assert all((labels[unseen] == p).sum() == 2 for p in set(labels[unseen]))
    with pytest.raises(TmpdiffError, match="whole prompts"):
        split_curve.split_size_curve(table, np.arange(16), COST, "fp32", [3], splits=1, sample_unit="prompts")


def test_selection_floor_halves_split_prompts(monkeypatch):
    """The floor's halves A and B of a pipeline's unseen samples share no prompt (under its other seed)."""
    import tmpdiff.calibration.lossy as lossy

    table = _prompts_table(prompts=12)
    table.seeds = [100 if s else 0 for s in table.seeds]
    cost = COST
    comparison = lossy.exhaustive_comparison(table, [0], [100], cost, "fp32", metrics=("latent",),
                                             calib_classes=list(range(4)), unseen_classes=list(range(4, 12)))
    unseen = table.samples_of([0, 100], list(range(4, 12)))
    comparison |= {"unseen_seeds": [0, 100], "calib_seeds": [0, 100], "calib_classes": list(range(4)),
                   "sample_unit": "prompts"}  # unseen: prompts 4-11 under both seeds
    _, judged = _recording(monkeypatch, lossy)
    floor = lossy.selection_floor(table, comparison, cost, splits=6)
    assert floor["split_unit"] == "prompts" and floor["half_samples"] == 8
    labels = np.asarray(table.labels)
    halves = [set(labels[s].tolist()) for s in judged]
    assert len(judged) >= 12 and all(len(s) == 8 for s in judged) and set(np.concatenate(judged)) == set(unseen)
    for i in range(0, len(judged), 2):  # per split and budget: optimum of B, then of A
        assert not halves[i] & halves[i + 1]


def test_the_bench_curve_halves_prompts_only_when_every_prompt_has_as_many_seeds():
    table = _prompts_table(prompts=8)  # prompts 0-7 under seeds 0 and 1
    spec = {"calib_seeds": [0, 1], "unseen_seeds": [0, 1], "calib_classes": [0, 1], "unseen_classes": list(range(2, 8)),
            "sample_unit": "prompts"}
    curve = split_curve.bench_split_curve(table, spec, COST, "fp32", None, splits=2)
    assert curve["split_unit"] == "prompts" and curve["sizes"] == [4, 8] and curve["unseen_samples"] == 8
    uneven = spec | {"calib_seeds": [0]}  # calibration prompts under one seed, unseen ones under two
    curve = split_curve.bench_split_curve(table, uneven, COST, "fp32", None, splits=2)
    assert curve["split_unit"] == "samples" and curve["samples"] == 14
