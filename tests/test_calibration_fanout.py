"""Calibration fanned out over Ray actors: the same schedule, evaluations and figures as one process (bit for bit at
the same thread count), a killed actor's schedule retried elsewhere, and the option checks."""

from __future__ import annotations

import pytest

from tests.cli_helpers import cli
from tmpdiff.calibration.calibrate import Target, calibrate
from tmpdiff.calibration.session import open_session
from tmpdiff.formats.errors import TmpdiffError

STEPS = 8
CLASSES = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def stated_costs(tmp_path_factory):
    """Three levels, so there are several sensitivity curves and refinement moves to fan out."""
    path = tmp_path_factory.mktemp("fanout") / "costs.json"
    code, _, err = cli("costs", "--device", "test", "--ratio", "fp32=1,int8=0.6,int4=0.45", "--source", "test",
                       "--out", path)
    assert code == 0, err
    return path


def _session(quant_build, costs, **fanout):
    _, build_dir, _ = quant_build
    return open_session(build_dir, costs, STEPS, "ssim", classes=CLASSES, seeds=[0], threads=1, **fanout)


def test_two_actors_calibrate_exactly_as_one_process(quant_build, stated_costs):
    ray = pytest.importorskip("ray")
    target = Target(speedup=1.6)
    alone = _session(quant_build, stated_costs)
    try:
        expected = calibrate(alone, target, timing_repeats=1)
    finally:
        alone.evaluator.close()
    notices: list[str] = []
    fanned = _session(quant_build, stated_costs, workers=2, on_notice=notices.append)
    try:
        pool = fanned.evaluator.pool
        assert pool.started_here and len(set(pool.pids)) == 2 and fanned.problem.lookahead == 2
        got = calibrate(fanned, target, timing_repeats=1)
        assert got.schedule == expected.schedule and got.file.evaluations == expected.file.evaluations
        # most of the work ran side by side (the rest: single midpoints, the first refinement candidate of a chunk)
        assert pool.side_by_side >= fanned.evaluator.runs / 2, (pool.side_by_side, fanned.evaluator.runs)
        for key, evaluation in alone.evaluator.cache.items():  # every figure the single process saw, bit for bit
            assert fanned.evaluator.cache[key] == evaluation, key
        assert got.file.measured.error == expected.file.measured.error

        # an actor dies: its schedule is retried on the other one, nothing is lost or changed
        ray.kill(pool.actors[0])
        unseen = [s for s in (tuple([a] * t + [b] * (STEPS - t)) for a in ("int4", "int8") for b in ("fp32", "int8")
                              for t in range(1, STEPS) if a != b) if s not in fanned.evaluator.cache]
        fresh, last = unseen[:4], unseen[4:6]
        fanned.evaluator.prefetch(fresh)
        assert pool.lost == 1 and pool.width == 1 and any("retried" in n for n in notices), notices
        again = _session(quant_build, stated_costs)
        try:
            for schedule in fresh:
                assert fanned.evaluator.cache[schedule] == again.evaluator.evaluate(schedule), schedule
        finally:
            again.evaluator.close()

        ray.kill(pool.actors[0])  # the last one
        with pytest.raises(TmpdiffError, match="every Ray evaluation worker died"):
            fanned.evaluator.prefetch(last)
    finally:
        fanned.evaluator.close()
    assert not ray.is_initialized()


@pytest.mark.parametrize("options, message", [
    (["--address", "127.0.0.1:6379"], "--address needs --workers"),
    (["--workers", "2", "--pipeline", "p", "--prompts", "q"], "a --pipeline session runs in this process"),
])
def test_fanout_options_are_checked_first(quant_build, stated_costs, tmp_path, options, message):
    _, build_dir, _ = quant_build
    code, _, err = cli("calibrate", build_dir, "--costs", stated_costs, "--speedup", 1.2, "--out", tmp_path / "s.json",
                       *options)
    assert code == 2 and message in err, err
    assert not (tmp_path / "s.json").exists()
