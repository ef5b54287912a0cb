"""`tmpdiff costs`: a costs table stated for a target device, its refusals, and calibrate/bench naming its origin."""

from __future__ import annotations

import json

import pytest

from tests.cli_helpers import cli
from tmpdiff.formats.costs import CostsTable, load_costs, save_costs
from tmpdiff.formats.errors import TmpdiffError

NOTE = "stated for Test GPU, source: vendor sheet p. 3; not measured here"

# a costs file exactly as `tmpdiff profile` wrote it before tables had an origin
OLD_MEASURED = {"format": "tmpdiff.costs/1", "model_id": "tiny-dit", "backend": "ort", "backend_version": "1.20.1",
                "device": "cpu: Intel Xeon", "batch": 8, "threads": None, "warmup": 1,
                "measured_at": "2025-01-01T00:00:00+00:00",
                "precisions": {"fp32": {"median_ms": 2.0, "p10_ms": 1.9, "p90_ms": 2.2, "repeats": 3},
                               "int8": {"median_ms": 1.4, "p10_ms": 1.3, "p90_ms": 1.5, "repeats": 3}}}


@pytest.fixture(scope="module")
def small_build(tmp_path_factory, bundled):
    """fp32 and fp16 of the bundled model (no quantization: quick), with sampling info, built for ORT-CPU."""
    from tmpdiff.engines.build import build_engines
    from tmpdiff.export.exporter import export_model
    from tmpdiff.models.bundled import sampling_info

    build_dir, _ = export_model(bundled.transformer_dir, tmp_path_factory.mktemp("sbuild"), ["fp32", "fp16"],
                                model_id="tiny-dit", sampling=sampling_info(bundled))
    build_engines(build_dir, "ort", "cpu")
    return build_dir


def _stated(path, ratios="fp32=1,fp16=0.5,int8=0.4", *extra):
    """`tmpdiff costs` for "Test GPU" into `path` (texts kept on one line); int8 is not exported by `small_build`."""
    return cli("costs", "--device", " Test GPU", "--ratio", ratios, "--source", "vendor sheet\n p. 3", "--out", path, *extra)


def test_round_trip(tmp_path):
    code, out, err = _stated(tmp_path / "c.json")
    assert code == 0, err
    assert NOTE in out and "wrote" in out
    raw = json.loads((tmp_path / "c.json").read_text())
    assert raw["origin"] == "stated" and raw["device"] == "Test GPU" and raw["source"] == "vendor sheet p. 3"
    assert not any(key.endswith("_ms") for entry in raw["precisions"].values() for key in entry)  # no fake times
    assert "measured_at" not in raw and "backend" not in raw
    table = load_costs(tmp_path / "c.json")
    assert table.origin == "stated" and table.unit == "ratio" and table.note() == NOTE
    assert table.step_costs() == {"fp32": 1.0, "fp16": 0.5, "int8": 0.4}
    assert table.relative("fp16") == {"fp32": 2.0, "fp16": 1.0, "int8": 0.8}
    save_costs(table, tmp_path / "again.json")
    assert load_costs(tmp_path / "again.json") == table
    code, out, _ = cli("costs", "--device", "Test GPU", "--ratio", "fp16=1", "--ratio", "fp8=0.55", "--source", "x",
                       "--out", tmp_path / "j.json", "--model-id", "tiny-dit", "--json")
    data = json.loads(out)
    assert code == 0 and data["precisions"] == {"fp16": {"ratio": 1.0}, "fp8": {"ratio": 0.55}}
    assert data["model_id"] == "tiny-dit" and data["wrote"] == str(tmp_path / "j.json")


@pytest.mark.parametrize(("args", "message"), [
    (["--ratio", "fp32=1,fp99=0.5"], "unknown precision 'fp99'"),
    (["--ratio", "fp32=1,fp16=0"], "--ratio fp16: the ratio must be a finite number above 0, got 0"),
    (["--ratio", "fp32=1,fp16=-0.5"], "--ratio fp16: the ratio must be a finite number above 0"),
    (["--ratio", "fp32=1,fp16=nan"], "--ratio fp16: the ratio must be a finite number above 0, got nan"),
    (["--ratio", "fp32=1,fp16=inf"], "--ratio fp16: the ratio must be a finite number above 0, got inf"),
    (["--ratio", "fp32=1,fp16=0.5", "--ratio", "fp16=0.6"], "--ratio gives fp16 twice"),
    (["--ratio", "fp32=1,fp16"], "--ratio takes PRECISION=RATIO pairs separated by commas, got 'fp16'"),
    (["--ratio", "fp32=1,=0.5"], "--ratio takes PRECISION=RATIO pairs"),
    (["--ratio", "fp32=1,fp16=half"], "--ratio fp16: 'half' is not a number"),
    (["--ratio", "fp32=1"], "give at least two PRECISION=RATIO pairs"),
    (["--ratio", " , "], "--ratio ' , ' has an empty pair"),
    (["--ratio", "fp32=1,,fp16=0.5"], "--ratio 'fp32=1,,fp16=0.5' has an empty pair"),
    (["--ratio", "fp32=1,fp16=0.5,"], "has an empty pair"),
    # finite, but a schedule's summed cost would not be (and its speedup NaN): refused when the table is made
    (["--ratio", "fp32=1e308,fp16=1e307"], "a step cost of 1e+308 is over 1e+12"),
    (["--ratio", "fp32=1,fp16=0.5", "--device", "  "], "--device is empty"),
    (["--ratio", "fp32=1,fp16=0.5", "--source", ""], "--source is empty"),
])
def test_refusals(tmp_path, args, message):
    base = {"--device": "Test GPU", "--source": "vendor sheet"}
    given = dict(zip(args[::2], args[1::2], strict=True))
    options = [item for key, value in base.items() if key not in given for item in (key, value)]
    code, out, err = cli("costs", *options, *args, "--out", tmp_path / "c.json")
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c.json").exists()


def test_output_rules(tmp_path):
    target = tmp_path / "c.json"
    target.write_text("keep")
    code, _, err = _stated(target)
    assert code == 2 and "--out exists; pass --force" in err and target.read_text() == "keep"
    code, _, err = _stated(tmp_path / "c.txt")
    assert code == 2 and "--out must end in .json" in err
    (tmp_path / "d.json").mkdir()
    code, _, err = _stated(tmp_path / "d.json")
    assert code == 2 and "is a directory" in err
    code, _, err = _stated(target, "fp32=1,fp16=0.5", "--force")
    assert code == 0, err
    assert load_costs(target).origin == "stated"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written atomically, no temp left


def test_old_measured_file_still_loads(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps(OLD_MEASURED))
    table = load_costs(tmp_path / "old.json")
    assert table.origin == "measured" and table.unit == "ms" and table.precisions["int8"].median_ms == 1.4
    assert table.relative() == {"fp32": 1.0, "int8": 0.7}
    assert table.note() == "measured on cpu: Intel Xeon (ort, batch 8)"
    save_costs(table, tmp_path / "new.json")
    assert json.loads((tmp_path / "new.json").read_text())["origin"] == "measured"
    assert load_costs(tmp_path / "new.json") == table


@pytest.mark.parametrize(("document", "problem"), [
    ({**OLD_MEASURED, "origin": "stated"}, "a stated table needs a device and a source"),
    ({**OLD_MEASURED, "batch": None}, "a measured table needs batch"),
    ({**OLD_MEASURED, "precisions": {"fp32": {"ratio": 1.0}}}, "millisecond figures, not ratios"),
    ({"format": "tmpdiff.costs/1", "origin": "stated", "device": "g", "source": "s",
      "precisions": {"fp32": {"ratio": 1.0, "median_ms": 3.0}}}, "without measured millisecond figures"),
    ({"format": "tmpdiff.costs/1", "origin": "stated", "device": "g", "source": "s",
      "precisions": {"fp99": {"ratio": 1.0}}}, "unknown precision fp99"),
    ({"format": "tmpdiff.costs/1", "origin": "stated", "device": "g", "source": "s",
      "precisions": {"fp32": {"ratio": 0.0}}}, "greater than 0"),
    ({**OLD_MEASURED, "precisions": {"fp32": {"median_ms": 1e308, "p10_ms": 1e308, "p90_ms": 1e308, "repeats": 3},
                                     "int8": {"median_ms": 1e305, "p10_ms": 1e305, "p90_ms": 1e305, "repeats": 3}}},
     "a step cost of 1e+308 is over 1e+12"),
    ({"format": "tmpdiff.costs/1", "origin": "guessed", "device": "g", "source": "s",
      "precisions": {"fp32": {"ratio": 1.0}}}, "origin"),
])
def test_inconsistent_files_are_refused(tmp_path, document, problem):
    (tmp_path / "c.json").write_text(json.dumps(document))
    with pytest.raises(TmpdiffError, match="c.json") as exc:
        load_costs(tmp_path / "c.json")
    assert problem in str(exc.value)


def test_profile_records_a_measured_table(small_build):
    from tmpdiff.engines.device import device_label
    from tmpdiff.engines.profile import profile_build

    table = profile_build(small_build, "ort", "cpu", batch=2, warmup=0, repeats=1)
    assert table.origin == "measured" and table.device == device_label("cpu") and table.source is None
    assert table.model_dump(mode="json")["origin"] == "measured"


def test_session_checks_stated_tables(small_build, tmp_path):
    from tmpdiff.calibration.session import open_session

    manifest = small_build / "manifest.json"
    for name, model_id, ratios, reference, problem, path in (
            ("other.json", "other-model", {"fp32": 1.0, "fp16": 0.5}, "fp32", "costs were stated for model 'other-model'",
             tmp_path / "other.json"),
            ("no-ref.json", None, {"fp16": 1.0, "fp8": 0.5}, "fp32", "no cost for the reference precision fp32 (the "
             "table has fp16, fp8; this build exported fp32, fp16; --reference", tmp_path / "no-ref.json"),
            ("fp8-ref.json", None, {"fp16": 1.0, "fp8": 0.5}, "fp8", "the reference precision fp8 was not exported for "
             "this build (exported: fp32, fp16)", manifest)):
        save_costs(CostsTable.stated("Test GPU", ratios, "s", model_id), tmp_path / name)
        with pytest.raises(TmpdiffError) as exc:
            open_session(small_build, tmp_path / name, 4, seeds=[0], classes=[0], reference=reference)
        assert problem in str(exc.value) and exc.value.path == path


def test_calibrate_with_a_stated_table_names_its_origin(small_build, tmp_path):
    from tmpdiff.formats.schedule import load_schedule

    assert _stated(tmp_path / "c.json")[0] == 0
    code, out, err = cli("calibrate", small_build, "--costs", tmp_path / "c.json", "--speedup", "1.3", "--steps", "4",
                         "--calib-seeds", "0", "--calib-classes", "0,1", "--out", tmp_path / "s.json",
                         "--report", tmp_path / "report")
    assert code == 0, err
    assert f"costs: {NOTE}" in out
    schedule = load_schedule(tmp_path / "s.json")
    assert schedule.predicted.speedup >= 1.3 - 1e-9
    assert schedule.costs["origin"] == "stated" and schedule.costs["note"] == NOTE
    assert schedule.costs["per_step_ratio"] == {"fp32": 1.0, "fp16": 0.5} and "per_step_ms" not in schedule.costs
    assert f"- costs (stated): {NOTE}" in (tmp_path / "report" / "calibration_report.md").read_text()
    assert json.loads((tmp_path / "report" / "validation.json").read_text())["costs"]["note"] == NOTE


def test_bench_with_a_stated_table_names_its_origin(small_build, tmp_path):
    assert _stated(tmp_path / "c.json")[0] == 0
    out_dir = tmp_path / "bench"
    code, out, err = cli("bench", small_build, "--costs", tmp_path / "c.json", "--out", out_dir, "--steps", "2",
                         "--speedups", "1.1", "--calib-seeds", "0")
    assert code == 0, err
    assert f"costs: {NOTE}" in out
    report = json.loads((out_dir / "bench.json").read_text())
    assert report["costs_table"]["origin"] == "stated" and report["costs_table"]["note"] == NOTE
    (run,) = report["runs"]
    assert run["cost_ratio"] == {"fp32": 1.0, "fp16": 0.5} and "cost_ms" not in run
    text = (out_dir / "bench.md").read_text()
    assert f"Costs (stated): {NOTE}." in text and "per-step ratio {" in text and "per-step ms" not in text


def test_bench_markdown_of_a_measured_table():
    from tmpdiff.calibration.bench import render_markdown

    table = CostsTable.model_validate(OLD_MEASURED)
    row = {"method": "uniform fp32", "schedule": ["fp32"] * 2, "speedup": 1.0, "latent_error": 0.0,
           "one_minus_ssim": 0.0, "ssim": 1.0, "psnr": None, "evaluations": 0}
    report = {"costs_table": table.provenance(), "runs": [
        {"steps": 2, "levels": ["fp32", "int8"], "cost_ms": table.step_costs(), "max_speedup": 1.4, "uniform": [row],
         "targets": []}]}
    text = render_markdown(report)
    assert "Costs (measured): measured on cpu: Intel Xeon (ort, batch 8)." in text
    assert "per-step ms {'fp32': 2.0, 'int8': 1.4}" in text
