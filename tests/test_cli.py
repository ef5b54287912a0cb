"""The command line: demo outputs, export caching, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from tmpdiff.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tmpdiff.cli", *args], capture_output=True, text=True, timeout=600)


def test_demo_runs_the_pipeline(tmp_path, bundled):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--per-class", "2", "--steps", "6", "--precisions", "fp32,int8"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "tmpdiff.demo/1"
    assert report["steps"] == 6 and len(report["step_ms"]) == 6
    assert len(report["schedule"]["precisions"]) == 6 and report["schedule"]["evaluations"] > 0
    assert set(report["runs"]) == {"reference (fp32)", "uniform int8", "TMPDiff schedule"}
    for name in ("report.md", "costs.json", "schedule.json", "calibration/calibration_report.md", "grid_tmpdiff.png"):
        assert (out / name).is_file(), name
    assert report["step_ms_median"] > 0 and report["total_seconds"] >= report["sampling_seconds"]
    assert 0.0 <= report["classifier_accuracy"] <= 1.0
    grid = Image.open(out / "grid.png")
    assert grid.height > grid.width / 2  # ten rows of two samples
    assert not list(out.rglob("*.tmp"))


def test_export_is_cached(tmp_path):
    first = run_cli("export", "bundled", "--out", str(tmp_path), "--precisions", "fp32,int8")
    assert first.returncode == 0, first.stderr
    assert "exported" in first.stdout
    manifest = (tmp_path / "tiny-dit/manifest.json").read_bytes()
    second = run_cli("export", "bundled", "--out", str(tmp_path), "--precisions", "fp32,int8")
    assert second.returncode == 0 and "up to date" in second.stdout
    assert (tmp_path / "tiny-dit/manifest.json").read_bytes() == manifest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "{tmp}/missing"], "model directory does not exist"),
        (["export", "{tmp}", "--precisions", "fp7"], "unknown precision 'fp7'"),
        (["export", "{tmp}"], "not a diffusers model directory"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    result = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "export", str(tmp_path / "missing"))
    assert result.returncode != 0 and "Traceback" in result.stderr
