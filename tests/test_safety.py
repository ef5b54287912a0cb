"""Adversarial use: outputs never replace what a user owns, manifest paths stay in the build dir, `check` checks what
`run` uses, and every bad option is one line on stderr with exit code 2 and nothing on disk changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.cli_helpers import cli
from tmpdiff.formats.manifest import load_manifest, save_manifest


def tree_digest(*roots: Path) -> dict[str, str]:
    """Every file and link under `roots`: content hash, link target or file type (what must not change)."""
    found = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            if path.is_symlink():
                found[str(path)] = "link:" + os.readlink(path)
            elif path.is_file() and path.name not in (".lock", ".lock.owner"):
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif not path.is_dir() and path.exists():
                found[str(path)] = "special"
    return found


def refused(args, *names: str, roots: tuple[Path, ...] = ()) -> str:
    """Run, expect exit 2 with one line on stderr naming each of `names`, and `roots` unchanged; returns the line."""
    before = tree_digest(*roots)
    code, _, err = cli(*args)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert tree_digest(*roots) == before
    return lines[0]


@pytest.fixture(scope="module")
def build(quant_build, tmp_path_factory) -> Path:
    """A private copy of the fully built bundled build (tests below tamper with copies of it)."""
    _, build_dir, _ = quant_build
    target = tmp_path_factory.mktemp("safety") / "tiny-dit"
    shutil.copytree(build_dir, target)
    return target


@pytest.fixture
def work(tmp_path) -> Path:
    return tmp_path


def run_args(build: Path, *extra) -> list:
    return ["run", build, "--precision", "fp32", "--steps", "2", "--class", "1", *extra]


# --- outputs never replace what a user owns -------------------------------------------------------------------------

def test_fifo_device_and_directory_outputs_are_refused(build, work):
    fifo = work / "p.png"
    os.mkfifo(fifo)
    refused(run_args(build, "--out", fifo), "FIFO", str(fifo), roots=(build, work))
    refused(run_args(build, "--out", fifo, "--force"), "FIFO", roots=(build, work))  # --force never writes to a FIFO
    device = work / "dev.png"
    try:
        os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null node (root only)
    except PermissionError:
        device = None
    if device is not None:
        refused(run_args(build, "--out", device, "--force"), "character device", roots=(build, work))
        assert device.is_char_device()
    (work / "dir.png").mkdir()
    refused(run_args(build, "--out", work / "dir.png"), "is a directory", roots=(build, work))
    refused(["profile", build, "--out", work / "dir.png", "--repeats", "1"], "--out", roots=(build, work))
    assert fifo.exists() and not fifo.is_file()


def test_symlink_output_needs_force_and_then_keeps_the_link(build, work):
    target, link = work / "t.png", work / "l.png"
    target.write_bytes(b"mine")
    link.symlink_to(target)
    refused(run_args(build, "--out", link), "symbolic link", "--force", roots=(build, work))
    code, out, err = cli(*run_args(build, "--out", link, "--force"))
    assert code == 0, err
    assert link.is_symlink() and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # written through, link kept
    # the bytes land in the target, so its name must end in .png too (was: PNG bytes written into a .json)
    (work / "s.json").write_text("{}")
    (work / "to-json.png").symlink_to(work / "s.json")
    refused(run_args(build, "--out", work / "to-json.png", "--force"), "symbolic link", "must end in .png",
            roots=(build, work))


def test_existing_output_is_kept_unless_forced(build, work):
    out = work / "a.png"
    out.write_bytes(b"mine")
    refused(run_args(build, "--out", out), "exists", "--force", roots=(build, work))
    code, _, err = cli(*run_args(build, "--out", out, "--force"))
    assert code == 0, err and out.read_bytes()[:4] == b"\x89PNG"


def test_inputs_and_build_files_are_never_outputs(build, work):
    schedule = work / "s.json"
    schedule.write_text(json.dumps({"format": "tmpdiff.schedule/1", "steps": 2, "precisions": ["fp32", "int8"]}))
    refused(run_args(build, "--out", build / "manifest.json", "--force"), "--out", roots=(build, work))
    refused(["run", build, "--schedule", schedule, "--trace", schedule, "--out", work / "x.png", "--force"],
            "input", roots=(build, work))
    refused(run_args(build, "--out", build / "int8" / "x.png"), "manages", roots=(build, work))
    refused(["profile", build, "--out", build / "manifest.json", "--force", "--repeats", "1"], "manages", roots=(build, work))
    costs = work / "c.json"
    costs.write_text("{}")
    refused(["calibrate", build, "--costs", costs, "--out", costs, "--speedup", "1.1", "--force"], "input",
            roots=(build, work))


def test_a_build_directory_is_protected_from_commands_that_do_not_name_it(build, work):
    """An output that lands in any build directory's managed files is refused, even from a command that takes no
    build directory (costs) and with --force; so is one under a precision folder reached through a symlink."""
    ratio = ["costs", "--device", "d", "--ratio", "fp32=1,int8=0.5", "--source", "s"]
    refused([*ratio, "--out", build / "manifest.json", "--force"], "manages", roots=(build, work))
    refused([*ratio, "--out", build / "fp32" / "c.json"], "manages", roots=(build, work))
    (work / "int8-link").symlink_to(build / "int8")
    refused([*ratio, "--out", work / "int8-link" / "c.json"], "manages", roots=(build, work))
    code, _, err = cli(*ratio, "--out", build.parent / "costs-beside.json")  # beside the build: fine
    assert code == 0, err
    (build.parent / "costs-beside.json").unlink()


def test_outputs_under_a_file_or_a_symlink_loop_are_refused_before_any_work(build, work):
    costs = work / "c.json"
    costs.write_text("{}")
    refused(run_args(build, "--out", work / "p.png", "--trace", costs / "sub" / "t.json"), "not a directory",
            roots=(build, work))
    assert not (work / "p.png").exists()  # refused before sampling, not after it
    (work / "loop.json").symlink_to(work / "loop.json")
    refused(["costs", "--device", "d", "--ratio", "fp32=1,int8=0.5", "--source", "s", "--out", work / "loop.json",
             "--force"], "--out", roots=(build, work))


def test_a_report_folder_never_writes_over_an_input_or_another_output(build, work):
    costs = work / "c.json"
    code, _, err = cli("costs", "--device", "d", "--ratio", "fp32=1,int8=0.6,int4=0.45", "--source", "s", "--out", costs)
    assert code == 0, err
    calibrate = ["calibrate", build, "--speedup", "1.2", "--steps", "4", "--calib-seeds", "0"]
    (work / "rep").mkdir()
    refused([*calibrate, "--costs", costs, "--out", work / "rep" / "validation.json", "--report", work / "rep"],
            "validation.json", roots=(build, work))
    shutil.copy(costs, work / "rep" / "validation.json")
    refused([*calibrate, "--costs", work / "rep" / "validation.json", "--out", work / "s.json", "--report", work / "rep",
             "--force"], "input", roots=(build, work))


def test_a_report_folders_files_are_checked_like_file_outputs(build, work):
    """With --force a non-empty report folder is written into, but a FIFO or a folder at one of its file names is
    refused before the work (was: the FIFO replaced silently; a folder failed after the whole search)."""
    costs = work / "c.json"
    code, _, err = cli("costs", "--device", "d", "--ratio", "fp32=1,int8=0.6,int4=0.45", "--source", "s", "--out", costs)
    assert code == 0, err
    calibrate = ["calibrate", build, "--costs", costs, "--speedup", "1.2", "--steps", "4", "--calib-seeds", "0", "--out",
                 work / "s.json", "--force"]
    (work / "rep").mkdir()
    os.mkfifo(work / "rep" / "images.png")
    refused([*calibrate, "--report", work / "rep"], "--report (images.png)", "FIFO", roots=(build, work))
    (work / "rep2" / "validation.json").mkdir(parents=True)
    refused([*calibrate, "--report", work / "rep2"], "--report (validation.json)", "directory", roots=(build, work))
    (work / "bench" / "bench.md").mkdir(parents=True)
    refused(["bench", build, "--costs", costs, "--steps", "2", "--speedups", "1.1", "--calib-seeds", "0",
             "--no-exhaustive", "--out", work / "bench", "--force"], "bench.md", "directory", roots=(build, work))
    # a symbolic link among them (to the build's manifest, another file, or an input) is refused before the work,
    # --force or not: the folder's files are replaced in place (was: the link replaced silently, or the input refused
    # only after the whole search)
    for n, target in enumerate((build / "manifest.json", work / "other.md", costs)):
        (work / f"rl{n}").mkdir()
        (work / f"rl{n}" / "calibration_report.md").symlink_to(target)
        refused([*calibrate, "--report", work / f"rl{n}"], "--report (calibration_report.md)", "symbolic link",
                roots=(build, work))


def test_seed_lists_and_unrunnable_plans_are_refused_before_any_work(build, work):
    costs = work / "c.json"
    code, _, err = cli("costs", "--device", "d", "--ratio", "fp32=1,int8=0.6", "--source", "s", "--out", costs)
    assert code == 0, err
    refused(["calibrate", build, "--costs", costs, "--out", work / "s.json", "--speedup", "1.2", "--calib-seeds", "-1"],
            "--calib-seeds", "0..2^63-1", roots=(build, work))
    manifest = json.loads((build / "manifest.json").read_text())
    plan = {"format": "tmpdiff.tmpq-plan/1", "model_id": manifest["model_id"], "steps": 3, "timesteps": [1500, 600, 300],
            "scheduler": {"class_name": manifest["sampling"]["scheduler_class"],
                          "config": manifest["sampling"]["scheduler_config"]},
            "layers": ["a", "b"], "configs": [["fp32", "int8"], ["int8", "int8"]], "step_configs": [0, 1, 1]}
    (work / "plan.json").write_text(json.dumps(plan))
    for command in (["deploy-plan", build, work / "plan.json"],  # it exported the plan's configurations before
                    ["run", build, "--schedule", work / "plan.json", "--out", work / "o.png"]):
        refused(command, "plan.json", "timestep 1500", roots=(build, work))


def test_writes_keep_inputs_and_files_that_appear_while_a_command_works(work):
    """The check and the write are apart (a calibration takes minutes): the write itself keeps an input, and a file
    that appeared at an output the check found free, unless --force said to replace it."""
    from tmpdiff.formats.atomic import clear_write_guard, write_json
    from tmpdiff.formats.errors import TmpdiffError
    from tmpdiff.formats.outputs import Output, check_outputs

    source, late, forced = work / "in.json", work / "late.json", work / "forced.json"
    source.write_text("mine")
    try:
        check_outputs([Output.file("--out", late, ".json"), Output.folder("--report", work / "rep")], inputs=[source])
        late.write_text("appeared meanwhile")
        with pytest.raises(TmpdiffError, match="appeared while the command ran"):
            write_json(late, {"result": 1})
        with pytest.raises(TmpdiffError, match="input of this command"):
            write_json(source, {"result": 1})  # e.g. a report file named like an input in the report folder
        assert late.read_text() == "appeared meanwhile" and source.read_text() == "mine"
        assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]  # no temp left behind
        check_outputs([Output.file("--out", forced, ".json")], force=True)
        forced.write_text("appeared meanwhile")
        write_json(forced, {"result": 2})  # --force: replaced
        assert json.loads(forced.read_text()) == {"result": 2}
        late.unlink()
        check_outputs([Output.file("--out", late, ".json")])
        write_json(late, {"result": 3})
        write_json(late, {"result": 4})  # written by this command already: a second write replaces its own file
        assert json.loads(late.read_text()) == {"result": 4}
    finally:
        clear_write_guard()


def test_extension_must_match_the_format_written(build, work):
    refused(run_args(build, "--out", work / "x.jpg"), ".png", roots=(build, work))
    refused(run_args(build, "--out", work / "x.png", "--trace", work / "t.txt"), ".json", roots=(build, work))
    refused(["profile", build, "--out", work / "c.txt", "--repeats", "1"], ".json", roots=(build, work))


def test_export_out_must_be_a_directory(work):
    afile = work / "root"
    afile.write_text("mine")
    refused(["export", "bundled", "--out", afile, "--precisions", "fp32"], "directory", roots=(work,))


# --- manifest paths stay in the build dir; check checks what run uses ------------------------------------------------

@pytest.fixture
def tampered(build, tmp_path) -> Path:
    copy = tmp_path / "tiny-dit"
    shutil.copytree(build, copy)
    return copy


def _problems(build_dir: Path) -> list[str]:
    code, out, err = cli("check", build_dir)
    assert code in (0, 1) and "Traceback" not in err, err
    return [line for line in out.splitlines() if " -> " in line]


def test_a_precision_name_cannot_lead_a_build_outside_its_directory(tampered, tmp_path):
    outside = tmp_path / "evil"
    outside.mkdir()
    (outside / "model.ort-cpu.onnx").write_text("precious")
    data = json.loads((tampered / "manifest.json").read_text())
    data["precisions"]["../evil"] = data["precisions"].pop("int4")
    (tampered / "manifest.json").write_text(json.dumps(data))
    for command in (["build", tampered, "--backend", "ort"], ["info", tampered],
                    ["run", tampered, "--precision", "fp32", "--steps", "2", "--out", tmp_path / "o.png"]):
        refused(command, "manifest.json", "'../evil'", "not a known precision", roots=(tampered, tmp_path))
    code, out, err = cli("check", tampered)  # check lists it as the build's problem
    assert code == 1 and "'../evil': not a known precision" in out, (code, out, err)
    assert (outside / "model.ort-cpu.onnx").read_text() == "precious"


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_engine_paths_are_confined(tampered, where, tmp_path):
    manifest = load_manifest(tampered)
    key = next(k for k in manifest.engines if k.endswith(":int8"))
    engine = manifest.engines[key]
    outside = tmp_path / "outside.onnx"
    shutil.copy(tampered / engine.path, outside)
    if where == "absolute":
        engine.path = str(outside)
    elif where == "dotdot":
        engine.path = "../outside.onnx"
    else:
        (tampered / engine.path).unlink()
        (tampered / engine.path).symlink_to(outside)
    save_manifest(tampered, manifest)
    assert any("escapes the build directory" in p for p in _problems(tampered))
    refused(["run", tampered, "--precision", "int8", "--steps", "2", "--out", tmp_path / "o.png"], "escapes")


def test_an_engine_whose_source_graph_escapes_is_not_current(tampered, tmp_path):
    """`check` refused a precision graph recorded outside the build dir while `run` used its engine and `build` said
    "up to date"; the freshness rule they share now refuses it too."""
    manifest = load_manifest(tampered)
    entry = manifest.precisions["int8"]
    shutil.copy(tampered / entry.onnx, tmp_path / "outside.onnx")
    entry.onnx = "../outside.onnx"
    save_manifest(tampered, manifest)
    refused(["run", tampered, "--precision", "int8", "--steps", "2", "--out", tmp_path / "o.png"], "escapes",
            roots=(tampered, tmp_path))
    before = tree_digest(tampered, tmp_path)
    code, _, err = cli("build", tampered, "--backend", "ort", "--precisions", "int8")
    assert code == 2 and "path escapes the build directory" in err.strip().splitlines()[-1], err  # not "up to date"
    assert tree_digest(tampered, tmp_path) == before
    code, out, err = cli("info", tampered, "--json")  # the escaping graph is a problem, not part of the build's size
    row = json.loads(out)["precisions"]["int8"]
    held = sum((tampered / rel).stat().st_size for rel, _ in entry.files() if rel != entry.onnx)
    assert code == 0 and "escapes the build directory" in row["state"] and row["bytes"] == held, (out, err)


def _identity_graph(path: Path, like: Path) -> None:
    """A graph with the engine's inputs and outputs whose output is just its latent input."""
    original = onnx.load(str(like), load_external_data=False)
    inputs = list(original.graph.input)
    out = original.graph.output[0]
    node = helper.make_node("Identity", [inputs[0].name], [out.name])
    graph = helper.make_graph([node], "identity", inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=original.ir_version)
    onnx.save(model, str(path))


def test_check_runs_the_engines_run_loads(tampered):
    """An engine swapped for a wrong graph, with its hash updated, passes every hash check: only replaying the
    recorded check input on the engine itself catches it."""
    manifest = load_manifest(tampered)
    key = next(k for k in manifest.engines if k.endswith(":int8"))
    path = tampered / manifest.engines[key].path
    _identity_graph(path, path)
    manifest.engines[key].sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    save_manifest(tampered, manifest)
    problems = _problems(tampered)
    assert any("int8 engine" in p and "check input" in p for p in problems), problems


def test_every_artifact_is_hashed(tampered):
    state = tampered / "int8" / "quant_state.safetensors"
    state.write_bytes(state.read_bytes()[: len(state.read_bytes()) // 2])
    problems = _problems(tampered)
    assert any("quant_state.safetensors" in p and "sha256" in p for p in problems), problems


def test_manifest_is_standard_json_and_refuses_non_finite_figures(tampered):
    text = (tampered / "manifest.json").read_text()

    def reject(token):
        raise ValueError(token)

    json.loads(text, parse_constant=reject)  # no NaN / Infinity anywhere
    data = json.loads(text)
    data["precisions"]["int8"]["error_vs_fp32"] = float("nan")
    (tampered / "manifest.json").write_text(json.dumps(data))
    line = refused(["info", tampered], "manifest.json", "precisions.int8.error_vs_fp32")
    assert "NaN or Infinity" in line


# --- schedules ------------------------------------------------------------------------------------------------------

def test_schedule_files_are_strict(build, work):
    for bad, word in [({"steps": 2, "precisions": ["fp32", "fp32"]}, "format"),
                      ({"format": "tmpdiff.schedule/1", "steps": "2", "precisions": ["fp32", "fp32"]}, "steps")]:
        path = work / f"bad-{word}.json"
        path.write_text(json.dumps(bad))
        refused(["run", build, "--schedule", path, "--out", work / f"{word}.png"], str(path), word)
    # NaN where the format keeps free-form figures (target, a plan's predicted/measured): not standard JSON
    path = work / "bad-nan.json"
    path.write_text('{"format": "tmpdiff.schedule/1", "steps": 2, "precisions": ["fp32", "fp32"], '
                    '"target": {"speedup": NaN}}')
    refused(["run", build, "--schedule", path, "--out", work / "nan.png"], str(path), "target.speedup: NaN or Infinity")


def test_numbers_in_quotes_are_refused_in_manifests_and_costs(tampered, work):
    original = (tampered / "manifest.json").read_text()
    data = json.loads(original)
    data["sampling"]["num_classes"] = "10"
    (tampered / "manifest.json").write_text(json.dumps(data))
    refused(run_args(tampered, "--out", work / "x.png"), "manifest.json", "num_classes")
    (tampered / "manifest.json").write_text(original)
    costs = work / "c.json"
    costs.write_text(json.dumps({"format": "tmpdiff.costs/1", "device": "d", "batch": 2,
                                 "precisions": {"fp32": {"median_ms": "5"}, "int8": {"median_ms": 2.5}}}))
    refused(["calibrate", tampered, "--costs", costs, "--speedup", "1.1", "--out", work / "s.json"], str(costs),
            "median_ms")


def test_a_schedule_runs_with_its_own_scheduler_and_refuses_another_noise_process(build, work):
    from tmpdiff.formats.schedule import Schedule, SchedulerRef
    from tmpdiff.models.schedulers import schedule_scheduler

    sampling = load_manifest(build).sampling
    euler = SchedulerRef(class_name="EulerDiscreteScheduler", config=sampling.scheduler_config)
    schedule = Schedule(steps=2, precisions=["fp32", "int8"], scheduler=euler)
    assert type(schedule_scheduler(schedule, sampling)).__name__ == "EulerDiscreteScheduler"
    other = SchedulerRef(class_name=sampling.scheduler_class, config=sampling.scheduler_config | {"beta_schedule": "linear"})
    path = work / "other.json"
    path.write_text(Schedule(steps=2, precisions=["fp32", "int8"], scheduler=other).model_dump_json())
    refused(["run", build, "--schedule", path, "--out", work / "o.png"], "noise process", "beta_schedule")
    # a spacing offset past the training timesteps: DDIM indexed past its noise table in the first step (a
    # traceback), DPM-Solver blamed the request's guidance for the NaN it made; `check` passed it
    for name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        offset = SchedulerRef(class_name=name, config=sampling.scheduler_config | {"timestep_spacing": "leading",
                                                                                 "steps_offset": 5000})
        path = work / f"offset-{name}.json"
        path.write_text(Schedule(steps=2, precisions=["fp32", "int8"], scheduler=offset).model_dump_json())
        refused(["run", build, "--schedule", path, "--out", work / "o.png"], path.name, "outside its 1000 training")
        code, out, _ = cli("check", build, "--schedule", path)
        assert code == 1 and path.name in out and "outside its 1000 training" in out, out


# --- one line and exit 2 for every bad number ----------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "names"), [
    (["--precision", "fp64"], ["unknown precision 'fp64'"]),
    (["--precision", "fp32", "--steps", "100000"], ["100000 steps"]),
    (["--precision", "fp32", "--seed", "99999999999999999999"], ["--seed"]),
    (["--precision", "fp32", "--guidance", "nan"], ["--guidance"]),
    (["--precision", "fp32", "--threads", "1000"], ["--threads"]),
    (["--precision", "fp32", "--backend", "bogus"], ["'bogus' is not one of 'ort', 'trt'"]),
    (["--precision", "fp32", "--batch", "100000"], ["GiB", "--batch"]),
])
def test_bad_run_options_are_one_line(build, work, extra, names):
    refused(["run", build, "--class", "1", "--out", work / "x.png", *extra], *names, roots=(build, work))


def test_a_huge_batch_is_refused_before_its_samples_are_listed(build, work):
    """--batch 10**9: a class per sample was listed before the memory check, a MemoryError traceback where the
    address space is smaller than the list (here 6 GiB, in a process of its own)."""
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    done = subprocess.run([sys.executable, "-m", "tmpdiff.cli", "run", str(build), "--precision", "fp32", "--steps",
                           "2", "--batch", str(10**9), "--out", str(work / "x.png")], capture_output=True, text=True,
                          preexec_fn=limit, timeout=600)
    assert done.returncode == 2 and "2000000000 batch rows" in done.stderr, done.stderr
    assert "use a smaller --batch" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_bad_targets_are_refused_before_any_work(build, work):
    costs = work / "c.json"
    costs.write_text("{}")
    refused(["calibrate", build, "--costs", costs, "--speedup", "nan"], "--speedup")
    refused(["calibrate", build, "--costs", costs, "--max-error", "nan"], "--max-error")
    refused(["bench", build, "--costs", costs, "--speedups", "nan", "--out", work / "b"], "--speedups")
    refused(["bench", build, "--costs", costs, "--speedups", "0.5", "--out", work / "b"], "--speedups")
    refused(["demo", "--speedup", "0.5", "--out", work / "d"], "--speedup")
    assert not (work / "b").exists() and not (work / "d").exists()


def test_a_run_during_a_build_names_the_writer(build, work):
    from tmpdiff.formats.atomic import directory_lock

    with directory_lock(build):
        refused(run_args(build, "--out", work / "x.png"), "is writing this build directory", f"PID {os.getpid()}")


# --- what users expect --------------------------------------------------------------------------------------------

def test_version_help_info_and_json(build):
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("tmpdiff ")
    code, out, _ = cli("run", "-h")
    assert code == 0 and "--schedule" in out
    code, out, err = cli("info", build, "--json")
    data = json.loads(out)
    assert code == 0 and set(data["precisions"]) == set(load_manifest(build).precisions)
    assert all(row["state"] == "ok" for row in [*data["precisions"].values(), *data["engines"].values()])
    code, out, err = cli("check", build, "--json")
    assert code == 0 and json.loads(out)["ok"] is True, out + err



def test_info_says_what_run_would_refuse(tampered):
    """`info`'s engine state is the freshness rule `run`, `profile` and `check` apply: an ORT engine built with
    another ORT version or for another CPU is not "ok" (it was: the version and device were not compared)."""
    data = json.loads((tampered / "manifest.json").read_text())
    fp32, int8 = "ort:cpu:fp32", "ort:cpu:int8"
    data["engines"][fp32]["backend_version"] = "1.0.0"
    data["engines"][int8]["device"] = "cpu: another CPU"
    from tmpdiff.engines.device import cpu_features, cpu_name

    same_name = next(key for key in data["engines"] if key not in (fp32, int8))
    data["engines"][same_name]["device"] = f"cpu: {cpu_name()}"  # the model name alone: instruction sets unknown
    (tampered / "manifest.json").write_text(json.dumps(data))
    code, out, err = cli("info", tampered, "--json")
    engines = json.loads(out)["engines"]
    assert code == 0 and "built with ort 1.0.0" in engines[fp32]["state"], out + err
    assert "another CPU" in engines[int8]["state"] and engines[int8]["version_and_device_checked"]
    assert (engines[same_name]["state"] != "ok") == bool(cpu_features()), engines[same_name]
    problems = _problems(tampered)  # check says the same
    assert all(any(key in line for line in problems) for key in (fp32, int8)), problems

def test_the_check_input_is_what_the_graph_gave(build):
    """The recorded check output is reproduced by the fp32 engine to float precision (the replay is meaningful)."""
    from safetensors.numpy import load_file

    from tmpdiff.engines.ort import OrtEngine

    recorded = load_file(str(build / "fp32" / "check_io.safetensors"))
    feeds = {k.removeprefix("input."): v for k, v in recorded.items() if k.startswith("input.")}
    got = OrtEngine(build / "fp32" / "model.onnx").infer(feeds)
    for name, value in got.items():
        assert np.allclose(value, recorded[f"output.{name}"], rtol=1e-5, atol=1e-6)
        assert np.abs(value).max() > 0  # a real output, not an empty buffer


def test_a_probe_of_the_build_lock_is_not_a_writer(tmp_path):
    """Readers probe the build lock for an instant; two probing at once (Ray actors loading the same engines) must not
    see each other as a writer, while a real writer holding the lock is reported with its PID."""
    import os
    import threading
    import time

    from filelock import FileLock

    from tmpdiff.formats.atomic import LOCK_NAME, directory_lock, lock_holder

    (tmp_path / LOCK_NAME).touch()
    probe_held, release = threading.Event(), threading.Event()

    def probe():  # another reader's probe, caught mid-hold
        with FileLock(str(tmp_path / LOCK_NAME), timeout=5):
            probe_held.set()
            release.wait(5)

    thread = threading.Thread(target=probe)
    thread.start()
    probe_held.wait(5)
    threading.Timer(0.2, release.set).start()
    started = time.perf_counter()
    assert lock_holder(tmp_path) is None  # waited the probe out
    assert time.perf_counter() - started < 1.0
    thread.join()
    with directory_lock(tmp_path):
        holder = []
        reader = threading.Thread(target=lambda: holder.append(lock_holder(tmp_path)))
        reader.start()
        reader.join()
    assert holder == [os.getpid()]


def test_the_lock_owner_file_is_never_written_through(tmp_path):
    """A symlink at the lock's owner file is replaced, not written through (its target outside the build kept); a
    FIFO there is replaced too (writing it blocked the command), and a reader never blocks on one."""
    import os
    import threading

    from tmpdiff.formats.atomic import OWNER_NAME, directory_lock, lock_holder

    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    build = tmp_path / "build"
    build.mkdir()
    (build / OWNER_NAME).symlink_to(victim)
    with directory_lock(build):
        assert not (build / OWNER_NAME).is_symlink() and (build / OWNER_NAME).read_text() == f"{os.getpid()}\n"
    assert victim.read_text() == "mine"
    os.mkfifo(build / OWNER_NAME)
    from filelock import FileLock

    with FileLock(str(build / ".lock")):  # another writer, whose owner file is a FIFO: not read (it would block)
        reader = threading.Thread(target=lambda: held.append(lock_holder(build)), daemon=True)
        held: list = []
        reader.start()
        reader.join(10)
        assert held == [-1]
    with directory_lock(build):
        assert (build / OWNER_NAME).is_file()


# --- review findings: inputs that are folders, links out of a build, read-only places, special files ----------------

def test_no_output_lands_inside_a_model_or_pipeline_the_command_reads(build, work):
    from tmpdiff.models.bundled import bundled_dir

    model = work / "model"
    shutil.copytree(bundled_dir(), model)
    # an export's build directory inside the model folder it reads, or inside that model's pipeline folder
    refused(["export", model / "transformer", "--precisions", "fp32", "--out", model], "inside", roots=(model,))
    refused(["export", model / "transformer", "--precisions", "fp32", "--out", model / "transformer"], "inside",
            roots=(model,))
    refused(["layer-costs", build, "--model", model, "--out", model / "transformer" / "config.json", "--force"],
            "inside", str(model), roots=(model, build))
    refused(["distill-embeddings", model, "--steps", "4", "--out", model / "transformer" / "e.safetensors",
             "--iterations", "1", "--force"], "inside", roots=(model,))
    refused(["run", build, "--pipeline", model, "--prompt", "a cat", "--precision", "fp32", "--out", work / "x.png",
             "--trace", model / "model_index.json", "--force"], "inside", roots=(model, build))


def test_build_writes_never_follow_a_link_out_of_the_build(work):
    from tmpdiff.formats.atomic import directory_lock, write_json

    outside = work / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_text("mine")
    build_dir = work / "out" / "tiny-dit"
    build_dir.mkdir(parents=True)
    (build_dir / "fp32").symlink_to(outside)
    code, _, err = cli("export", "bundled", "--out", work / "out", "--precisions", "fp32")
    assert code == 2 and "holds fp32/ but no manifest.json: not a tmpdiff build" in err  # no lock: someone else's
    (build_dir / ".lock").touch()  # as an export killed before its first manifest leaves it: the link is what stops it
    code, _, err = cli("export", "bundled", "--out", work / "out", "--precisions", "fp32")
    assert code == 2 and "a symbolic link leads this path out of the build directory" in err and "Traceback" not in err
    with directory_lock(build_dir), pytest.raises(Exception, match="symbolic link leads this path out"):
        write_json(build_dir / "fp32" / "x.json", {})
    write_json(work / "elsewhere.json", {})  # outside the locked build: not confined
    assert sorted(p.name for p in outside.iterdir()) == ["model.onnx"] and (outside / "model.onnx").read_text() == "mine"
    refused(["export", "bundled", "--out", work / "out", "--model-id", "../escaped", "--precisions", "fp32"],
            "one folder name", roots=(work,))


def test_a_manifest_this_version_cannot_read_still_protects_its_build(tampered, work):
    data = json.loads((tampered / "manifest.json").read_text())
    data["format"] = "tmpdiff.manifest/99"
    (tampered / "manifest.json").write_text(json.dumps(data))
    ratio = ["costs", "--device", "d", "--ratio", "fp32=1,int8=0.5", "--source", "s"]
    refused([*ratio, "--out", tampered / "manifest.json", "--force"], "manages", roots=(tampered,))
    refused([*ratio, "--out", tampered / "int8" / "quant_config.json", "--force"], "manages", roots=(tampered,))
    refused(["info", tampered], "manifest.json", "format tmpdiff.manifest/99 is not one this tmpdiff reads",
            "written by a newer tmpdiff?", roots=(tampered,))
    schedule = work / "a-schedule.json"  # one tmpdiff file kind given for another: named as such
    schedule.write_text(json.dumps({"format": "tmpdiff.schedule/2", "steps": 2, "precisions": ["fp32", "fp32"]}))
    # (--model named: without it deploy-plan reads the build's manifest first, for the model's hash, and stops there)
    refused(["deploy-plan", tampered, schedule, "--model", "bundled"], str(schedule),
            "a tmpdiff.schedule/2 file, not a TMPQ-DM plan", roots=(tampered,))



def test_a_corrupt_manifest_is_started_over_with_force(tampered):
    """`check` says how to recover a build whose manifest cannot be read, and that recovery works: without --force
    export refuses and names it, with --force it starts the build over."""
    (tampered / "manifest.json").write_text('{"format": "tmpdiff.manifest/2", ')
    assert any("not valid JSON" in line and "tmpdiff export ... --force" in line for line in _problems(tampered))
    export = ["export", "bundled", "--out", tampered.parent, "--model-id", tampered.name, "--precisions", "fp32"]
    refused(export, "not valid JSON", "pass --force to start this build over", roots=(tampered,))
    code, _, err = cli(*export, "--force")
    assert code == 0, err
    assert set(load_manifest(tampered).precisions) == {"fp32"}

def test_special_files_and_read_only_places(build, work, monkeypatch):
    fifo = work / "schedule.json"
    os.mkfifo(fifo)
    refused(["run", build, "--schedule", fifo, "--out", work / "x.png"], "not a regular file", roots=(build,))
    code, out, err = cli("check", build, "--schedule", fifo)
    assert code == 1 and "not a regular file" in out and "Traceback" not in err, (out, err)
    (work / "fifo-build").mkdir()
    os.mkfifo(work / "fifo-build" / "manifest.json")  # named, not "no manifest.json" (was), and never blocked on
    refused(["info", work / "fifo-build"], "manifest.json", "not a regular file", roots=(build,))
    if Path("/proc").is_dir():  # a folder nobody can write into: refused before any work
        refused(["costs", "--device", "d", "--ratio", "fp32=1,int8=0.5", "--source", "s", "--out", "/proc/c.json"],
                "cannot write in /proc")
    # a read-only build (a deployment's mount): its lock cannot be probed by opening it, and nobody is writing it
    import filelock

    from tmpdiff.formats.atomic import lock_holder

    def read_only(*_, **__):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
    (build / ".lock").touch()
    assert lock_holder(build) is None
    code, _, err = cli(*run_args(build, "--out", work / "ro.png"))
    assert code == 0, err


def test_scheduler_configs_diffusers_refuses_are_named(tampered, work):
    schedule = work / "s.json"
    manifest = json.loads((tampered / "manifest.json").read_text())
    config = dict(manifest["sampling"]["scheduler_config"]) | {"timestep_spacing": "bogus"}
    schedule.write_text(json.dumps({"format": "tmpdiff.schedule/1", "steps": 2, "precisions": ["fp32", "fp32"],
                                    "scheduler": {"class_name": manifest["sampling"]["scheduler_class"], "config": config}}))
    refused(["run", tampered, "--schedule", schedule, "--out", work / "x.png"], str(schedule), "bogus is not supported",
            roots=(tampered,))
    manifest["sampling"]["scheduler_config"]["beta_schedule"] = "nope"
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    problems = _problems(tampered)
    assert any("sampling:" in line and "nope" in line for line in problems), problems
    manifest["sampling"] |= {"num_classes": 1000, "null_class": 1000}  # not the exported DiT's (10 classes + null)
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    problems = _problems(tampered)
    assert any("label table has 10 classes" in line for line in problems), problems
    refused(run_args(tampered, "--out", work / "y.png"), "label table has 10 classes", roots=(tampered,))


def test_check_names_a_check_input_that_cannot_be_read(tampered):
    from tmpdiff.formats.atomic import sha256_file

    path = tampered / "int8" / "check_io.safetensors"
    path.write_bytes(b"\xff" * 64)
    manifest = load_manifest(tampered)
    manifest.precisions["int8"].artifacts["int8/check_io.safetensors"] = sha256_file(path)
    save_manifest(tampered, manifest)
    problems = _problems(tampered)
    assert any("check input" in line and "cannot be read" in line for line in problems), problems


def test_calibrate_on_one_sample_writes_its_report_and_schedule_first(build, work):
    code, _, err = cli("costs", "--device", "d", "--ratio", "fp32=1,int8=0.5", "--source", "s", "--out", work / "c.json")
    assert code == 0, err
    code, _, err = cli("calibrate", build, "--costs", work / "c.json", "--speedup", "1.05", "--steps", "3",
                       "--calib-classes", "0", "--calib-seeds", "0", "--out", work / "s.json", "--report", work / "rep")
    assert code == 0, err
    assert (work / "s.json").is_file() and (work / "rep" / "images.png").is_file()


def test_build_never_writes_an_engine_through_a_linked_precision_folder(tampered, tmp_path):
    """The manifest's fp32 graph pointed at fp16's (so its hash checks out) and `fp32/` a link to a user's folder:
    the build refuses to write the engine there."""
    outside = tmp_path / "users"
    shutil.move(str(tampered / "fp32"), str(outside))
    (tampered / "fp32").symlink_to(outside)
    before = tree_digest(outside)
    manifest = load_manifest(tampered)
    fp16 = manifest.precisions["fp16"]
    manifest.precisions["fp32"] = manifest.precisions["fp32"].model_copy(update={"onnx": fp16.onnx, "sha256": fp16.sha256})
    manifest.engines = {k: v for k, v in manifest.engines.items() if v.precision != "fp32"}
    save_manifest(tampered, manifest)
    code, _, err = cli("build", tampered, "--precisions", "fp32")
    assert code == 2 and "symbolic link leads this path out of the build directory" in err and "Traceback" not in err, err
    assert tree_digest(outside) == before


def test_bench_names_what_it_writes_before_any_work(build, work):
    folder = work / "bo"
    folder.mkdir()
    costs = folder / "bench.json"
    code, _, err = cli("costs", "--device", "d", "--ratio", "fp32=1,int8=0.5", "--source", "s", "--out", costs)
    assert code == 0, err
    refused(["bench", build, "--costs", costs, "--out", folder, "--force", "--steps", "4", "--speedups", "1.2",
             "--no-exhaustive"], "--out (bench.json) is also an input", roots=(folder, build))


def test_an_unknown_scheduler_in_the_manifest_names_it(tampered, work):
    data = json.loads((tampered / "manifest.json").read_text())
    data["sampling"]["scheduler_class"] = "FooScheduler"
    (tampered / "manifest.json").write_text(json.dumps(data))
    refused(run_args(tampered, "--out", work / "x.png"), str(tampered / "manifest.json"), "FooScheduler",
            roots=(tampered,))


def test_a_timing_cache_is_updated_but_never_a_build_file_or_a_fifo(build, work):
    """`build --backend trt --timing-cache F` reads F and writes it back: a cache file there is updated without --force,
    but F at a build's file or on a FIFO is refused before TensorRT is touched (it was written unchecked)."""
    trt = ["build", build, "--backend", "trt", "--timing-cache"]
    refused([*trt, build / "manifest.json"], "--timing-cache", "manages", roots=(build,))
    os.mkfifo(work / "cache.fifo")
    refused([*trt, work / "cache.fifo"], "FIFO", roots=(build, work))
    (work / "timing.cache").write_bytes(b"an earlier cache")
    code, _, err = cli(*trt, work / "timing.cache")  # accepted: the next refusal is this machine's missing TensorRT
    assert code == 2 and "--timing-cache" not in err and "TensorRT" in err, err


def test_check_compares_the_manifests_inputs_with_the_graphs(tampered):
    """Engines are bound, and TensorRT profiles built, by the manifest's inputs: an edited input rank passed `check`."""
    data = json.loads((tampered / "manifest.json").read_text())
    data["inputs"][0]["shape"] = data["inputs"][0]["shape"][:-1]
    (tampered / "manifest.json").write_text(json.dumps(data))
    code, out, _ = cli("check", tampered)
    assert code == 1 and "fp32/model.onnx: fp32: its inputs" in out and "are not the manifest's" in out, out


def test_options_that_cannot_apply_are_refused_by_name_before_any_work(build, work):
    """A non-finite guidance scale in every command that takes one (was: search-plan and calibrate sampled without
    guidance and recorded none, distill-embeddings trained and then failed), per-layer choices naming no quantized
    precision (was: searched every one), and options of a mode not asked for (were ignored)."""
    costs = work / "c.json"
    costs.write_text("{}")
    guided = [(["run", build, "--out", work / "g.png"], "--guidance"),
              (["calibrate", build, "--costs", costs, "--speedup", "1.2", "--out", work / "g.json"], "--guidance"),
              (["bench", build, "--costs", costs, "--out", work / "gb"], "--guidance"),
              (["search-plan", build, "--layer-costs", costs, "--out", work / "g.json"], "--guidance"),
              (["distill-embeddings", "bundled", "--out", work / "g.safetensors"], "--guidance"),
              (["export", "bundled", "--out", work / "gx"], "--calib-guidance")]
    for args, option in guided:
        for value in ("nan", "inf"):
            refused([*args, option, value], f"{option} must be a finite number, got {value}", roots=(build, work))
    search = ["search-plan", build, "--layer-costs", costs, "--out", work / "p.json"]
    refused([*search, "--precisions", "fp32"], "--precisions 'fp32' names no quantized precision", roots=(build, work))
    refused([*search, "--max-configs", "3"], "--max-configs applies to --per-step", roots=(build, work))
    refused([*run_args(build, "--out", work / "m.png"), "--mode", "aggressive"], "--mode applies to --parallel",
            roots=(build, work))
    assert not [p for p in work.iterdir() if p.name.startswith(("g", "p.", "m."))]
