"""Crash safety: `tmpdiff export` / `tmpdiff build` killed mid-way leave a build dir that `tmpdiff check` passes or
faults by name, a plain re-run finishes it (removing the killed run's temp files), and concurrent builds serialise.

Two kinds of kill point:
- deterministic: the CLI runs under a small driver that stops the process just before a chosen artifact is renamed
  into place (its temp file complete, the final name untouched) and writes a marker; the test then signals it;
- timed: the real `tmpdiff` executable is killed a seeded random delay after a progress line it prints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

TMPDIFF = str(Path(sys.executable).with_name("tmpdiff"))
EXPORT_ARGS = ["export", "bundled", "--precisions", "fp32,int8", "--calib-seeds", "0", "--calib-classes", "0"]
TIMEOUT = 300.0

# Runs `tmpdiff.cli.main(argv[5:])`, logging filelock at DEBUG to stderr. If argv[3] names an artifact (path relative to
# the build dir), the argv[4]-th os.replace onto it writes the temp path to argv[1] and waits for argv[2] to appear.
CLEAN_EXITS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the CLI's exit codes when it unwinds on these signals
DRIVER = r"""
import logging, os, sys, time
from pathlib import Path

marker, release, target, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("filelock: %(message)s"))
logging.getLogger("filelock").addHandler(handler)
logging.getLogger("filelock").setLevel(logging.DEBUG)
_replace, seen = os.replace, [0]


def replace(src, dst, *args, **kwargs):
    if target != "-" and Path(dst).as_posix().endswith("/" + target):
        seen[0] += 1
        if seen[0] == nth:
            Path(marker).write_text(str(src))
            deadline = time.monotonic() + 600
            while not os.path.exists(release):
                if time.monotonic() > deadline:
                    raise SystemExit("driver: never released")
                time.sleep(0.02)
    return _replace(src, dst, *args, **kwargs)


os.replace = replace
from tmpdiff.cli import main

sys.exit(main(sys.argv[5:]))
"""


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Run:
    """A CLI process with its output in files (a paused process must not block on a full pipe)."""

    proc: subprocess.Popen
    marker: Path
    release: Path
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def finish(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)


def start(args: list[str], work: Path, name: str, stop_at: str = "-", nth: int = 1, driver: bool = True) -> Run:
    """Start `tmpdiff ARGS` (under the driver, stopping before the nth rename onto `stop_at`, or the real executable)."""
    work.mkdir(parents=True, exist_ok=True)
    marker, release, out, err = (work / f"{name}.{suffix}" for suffix in ("marker", "release", "out", "err"))
    command = [sys.executable, "-c", DRIVER, str(marker), str(release), stop_at, str(nth), *args] if driver \
        else [TMPDIFF, *args]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=work, preexec_fn=_interruptible)
    return Run(proc, marker, release, out, err)


def _interruptible() -> None:
    """In the child before exec: Ctrl-C as at a terminal. A suite started in the background of a non-interactive
    shell (`scripts/test.sh &`) has SIGINT ignored, a disposition children inherit across exec, and Python then
    never turns SIGINT into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pending_temp(run: Run) -> Path:
    """The temp entry a stopped run was about to rename: the (hidden) file itself or the temp directory holding it."""
    src = Path(run.marker.read_text())
    return next(p for p in (src, *src.parents) if p.name.startswith("."))


def kill_at(args: list[str], work: Path, name: str, stop_at: str, nth: int, sig: signal.Signals) -> tuple[Run, Path]:
    """Run until it is about to rename `stop_at` into place, send `sig`, reap it; return the run and its pending temp."""
    run = start(args, work, name, stop_at, nth)
    try:
        wait_for(lambda: run.marker.exists() or run.proc.poll() is not None, f"{name} to reach {stop_at}")
        assert run.marker.exists(), f"{name} ended (exit {run.proc.returncode}) before {stop_at}:\n{run.stderr()}"
        temp = pending_temp(run)
        assert temp.exists()
        run.proc.send_signal(sig)
        code = run.finish(60)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    if sig in CLEAN_EXITS:  # Ctrl-C / SIGTERM unwind without a traceback; finally-blocks remove the temp
        assert code == CLEAN_EXITS[sig] and "Traceback" not in run.stderr(), run.stderr()
        assert not temp.exists()
    else:  # SIGKILL: no handler runs, the temp stays behind, the final name was never touched
        assert code == -sig, run.stderr()
        assert temp.exists()
    return run, temp


def check(build_dir: Path) -> tuple[int, list[str]]:
    """`tmpdiff check`: exit 0 (`ok`) or exit 1 with one `path: problem -> fix` line per problem, never an exception.
    Run in this process (the killed commands are the real executable): a fresh one spends ~3.5 s importing."""
    from tests.cli_helpers import cli

    code, out, err = cli("check", build_dir)
    lines = out.strip().splitlines()
    assert code in (0, 1), out + err
    if code == 0:
        assert lines == [f"{build_dir}: ok"]
        return 0, []
    assert lines
    for line in lines:
        assert line.startswith(str(build_dir)) and " -> " in line, line
    return 1, lines


def temps(build_dir: Path) -> list[Path]:
    return sorted(p for p in build_dir.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp"))


def assert_nothing_half_written(build_dir: Path) -> None:
    """Every file under its final name is complete: graphs pass the ONNX checker, JSON parses, safetensors load."""
    import onnx
    from safetensors.numpy import load_file

    for path in sorted(build_dir.rglob("*")):
        if path.is_dir() or path.name in (".lock", ".lock.owner") or any(p.name.endswith(".tmp") for p in (path, *path.parents)):
            continue
        if path.suffix == ".onnx":
            onnx.checker.check_model(onnx.load(str(path)))
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            assert load_file(str(path))
        else:
            pytest.fail(f"unexpected file {path}")


def manifest_state(build_dir: Path) -> tuple[list[str], list[str]] | None:
    """(precisions, engines) the manifest lists, or None without a manifest."""
    path = build_dir / "manifest.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return sorted(data["precisions"]), sorted(data["engines"])


def report(line: str) -> None:
    print(f"[crash-safety] {line}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, float]:
    """fp32 + int8 of the bundled model exported by the real CLI, and the wall time that took."""
    root = tmp_path_factory.mktemp("exported").resolve()
    started = time.perf_counter()
    result = subprocess.run([TMPDIFF, *EXPORT_ARGS, "--out", str(root)], capture_output=True, text=True, timeout=TIMEOUT)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    report(f"full export took {seconds:.1f} s")
    return root / "tiny-dit", seconds


def test_only_temps_of_dead_writers_are_leftovers(tmp_path):
    """A temp whose writer is gone is a leftover (reported, removed under the lock); a live writer's temp is kept."""
    from tmpdiff.formats.atomic import directory_lock, interrupted_writes, temp_prefix

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (tmp_path / "fp32").mkdir()
    dead_file = tmp_path / f".manifest.json.{gone}.k2j4x9q1.tmp"
    dead_file.write_text("{")
    dead_dir = tmp_path / "fp32" / f".model.onnx.{gone}.a8d0e3zz.tmp"
    dead_dir.mkdir()
    (dead_dir / "model.onnx").write_bytes(b"half")
    live = tmp_path / "fp32" / f"{temp_prefix('model.onnx')}q0w9e8r7.tmp"  # a write in progress in this process
    kept = [live, tmp_path / ".notes.tmp", tmp_path / "fp32" / "model.onnx", tmp_path / "schedule.json"]
    for path in kept[1:]:
        path.write_text("{}")
    live.write_bytes(b"in flight")

    assert interrupted_writes(tmp_path) == [dead_file, dead_dir]
    with directory_lock(tmp_path):
        assert not dead_file.exists() and not dead_dir.exists()
    assert all(path.exists() for path in kept)
    assert interrupted_writes(tmp_path) == []



def test_scratch_of_dead_processes_is_removed_from_the_temp_dir(tmp_path, monkeypatch):
    """Scratch directories in the system temp dir (a traced graph, AutoCast's held weights) carry their process's PID:
    a killed export's are removed by the next scratch use; a live process's, unnamed ones and files are kept."""
    import tempfile

    from tmpdiff.formats.atomic import scratch_directory

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    dead = tmp_path / f"tmpdiff-autocast-{gone}-x1y2z3"
    dead.mkdir()
    (dead / "held_weights.bin").write_bytes(b"gigabytes")
    kept = [tmp_path / f"tmpdiff-export-{os.getpid()}-live", tmp_path / "tmpdiff-export-abc123",
            tmp_path / f"other-{gone}-dir"]
    for path in kept:
        path.mkdir()
    (tmp_path / f"tmpdiff-export-{gone}-file").write_text("not a directory")
    with scratch_directory("export") as scratch:
        assert scratch.parent == tmp_path and scratch.name.startswith(f"tmpdiff-export-{os.getpid()}-")
        assert not dead.exists() and all(path.is_dir() for path in kept)
    assert not scratch.exists() and (tmp_path / f"tmpdiff-export-{gone}-file").is_file()

def copy_build(exported: tuple[Path, float], tmp_path: Path) -> Path:
    target = tmp_path.resolve() / "out" / "tiny-dit"
    shutil.copytree(exported[0], target)
    return target


def assert_check_reports(build_dir: Path, named: list[str] | None, event: str) -> list[str]:
    """After a kill: nothing half-written, and `check` passes (`named` None) or names every fragment in `named`."""
    assert_nothing_half_written(build_dir)
    code, lines = check(build_dir)
    report(f"{event}; check exit {code}: {lines or 'ok'}")
    if named is None:
        assert code == 0, lines
    else:
        assert code == 1
        for fragment in named:
            assert any(fragment in line for line in lines), (fragment, lines)
    return lines


# Export, stopped just before each rename below, in this order, each run starting from the previous one's wreckage:
# (artifact, nth rename of it in that run, signal, what the manifest lists afterwards, what check must name or None).
EXPORT_POINTS = [
    ("fp32/model.onnx", 1, signal.SIGKILL, None, ["fp32/.model.onnx.", "no manifest.json"]),
    ("manifest.json", 1, signal.SIGTERM, None, ["no manifest.json"]),
    ("int8/quant_state.safetensors", 1, signal.SIGINT, ["fp32"], None),
    ("int8/model.onnx", 1, signal.SIGKILL, ["fp32"], ["int8/.model.onnx."]),
    ("manifest.json", 1, signal.SIGKILL, ["fp32"], [".manifest.json."]),
]


@pytest.mark.slow
def test_export_killed_at_each_write_then_rerun(tmp_path):
    out = tmp_path.resolve() / "out"
    build_dir = out / "tiny-dit"
    args = [*EXPORT_ARGS, "--out", str(out)]
    previous: Path | None = None
    for i, (stop_at, nth, sig, listed, named) in enumerate(EXPORT_POINTS):
        run, temp = kill_at(args, tmp_path / "runs", f"export{i}", stop_at, nth, sig)
        if previous is not None:
            assert not previous.exists(), f"{previous} from the killed run before survived a re-run"
        state = manifest_state(build_dir)
        assert (state and state[0]) == listed
        lines = assert_check_reports(build_dir, named, f"export stopped before renaming {stop_at} ({sig.name}): "
                                     f"exit {run.proc.returncode}")
        if sig not in CLEAN_EXITS:
            assert any(line.startswith(f"{temp}:") for line in lines), (temp, lines)
        previous = temp if temp.exists() else None

    final = subprocess.run([TMPDIFF, *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert final.returncode == 0 and "Traceback" not in final.stderr, final.stderr
    assert previous is not None and not previous.exists()
    assert manifest_state(build_dir) == (["fp32", "int8"], [])
    assert temps(build_dir) == []
    assert_nothing_half_written(build_dir)
    assert check(build_dir) == (0, [])


def test_export_refuses_a_folder_it_did_not_make(tmp_path):
    """A folder holding a precision's folder but neither a manifest nor tmpdiff's lock was made by someone else (a
    killed export's folder has the lock: the re-runs above go on): refused without --force, before the lock is taken."""
    from tests.cli_helpers import cli
    from tmpdiff.export.exporter import export_model
    from tmpdiff.formats.errors import TmpdiffError
    from tmpdiff.models.bundled import bundled_dir

    mine = tmp_path / "out" / "mine"
    (mine / "fp32").mkdir(parents=True)
    (mine / "fp32" / "model.onnx").write_bytes(b"the user's graph")
    args = ["export", "bundled", "--precisions", "fp32", "--out", tmp_path / "out", "--model-id", "mine"]
    code, _, err = cli(*args)
    assert code == 2 and "holds fp32/ but no manifest.json: not a tmpdiff build" in err and "--force" in err, err
    with pytest.raises(TmpdiffError, match="not a tmpdiff build"):  # the Python API too
        export_model(bundled_dir() / "transformer", tmp_path / "out", ["fp32"], model_id="mine")
    assert (mine / "fp32" / "model.onnx").read_bytes() == b"the user's graph" and sorted(mine.iterdir()) == [mine / "fp32"]
    code, _, err = cli(*args, "--force")
    assert code == 0, err
    assert (mine / "manifest.json").is_file() and (mine / "fp32" / "model.onnx").read_bytes() != b"the user's graph"


# Real `tmpdiff export`, killed a seeded random delay (up to 15% of a full export's wall time) after each of these
# progress lines, in this order, each run starting from the last one's state: inside the fp32 export, after fp32 is in
# the manifest (int8 calibration), inside the int8 export.
TIMED_EXPORT_KILLS = [("fp32: exporting", signal.SIGKILL), ("capturing calibration inputs", signal.SIGTERM),
                      ("int8: exporting", signal.SIGKILL)]


@pytest.mark.slow
def test_export_killed_at_timed_points_then_rerun(exported, tmp_path):
    out = tmp_path.resolve() / "out"
    build_dir = out / "tiny-dit"
    args = [*EXPORT_ARGS, "--out", str(out)]
    full = exported[1]
    rng = random.Random(20251122)
    for i, (line, sig) in enumerate(TIMED_EXPORT_KILLS):
        delay = rng.uniform(0.0, 0.15) * full
        run = start(args, tmp_path / "runs", f"timed{i}", driver=False)
        try:
            wait_for(lambda run=run, line=line: line in run.stderr() or run.proc.poll() is not None, f"{line!r} from run {i}")
            assert line in run.stderr(), run.stderr()
            try:
                run.finish(delay)
                killed = False
            except subprocess.TimeoutExpired:
                run.proc.send_signal(sig)
                run.finish(60)
                killed = True
        finally:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
        state = manifest_state(build_dir)
        assert_nothing_half_written(build_dir)
        code, lines = check(build_dir)
        report(f"export {'killed' if killed else 'finished before it was killed'} {delay:.2f} s after {line!r} "
               f"({sig.name}): manifest {state}; leftovers {[str(p.relative_to(build_dir)) for p in temps(build_dir)]}; "
               f"check exit {code}: {lines or 'ok'}")
        assert run.proc.returncode == (CLEAN_EXITS.get(sig, -sig) if killed else 0), run.stderr()
        if code == 1 and state is not None:  # leftovers: temps, or a precision's files not recorded yet
            unrecorded = [line for line in lines if "files the manifest does not record" in line]
            assert temps(build_dir) or unrecorded, "with an intact manifest and no leftovers, check must pass"
            assert not any(line.split(":", 1)[0].endswith(tuple(state[0])) for line in unrecorded), (state, lines)

    final = subprocess.run([TMPDIFF, *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert final.returncode == 0 and "Traceback" not in final.stderr, final.stderr
    assert manifest_state(build_dir) == (["fp32", "int8"], [])
    assert temps(build_dir) == []
    assert check(build_dir) == (0, [])


BUILD_POINTS = [
    ("fp32/model.ort-cpu.onnx", 1, signal.SIGKILL, [], ["fp32/.model.ort-cpu.onnx."]),
    ("manifest.json", 1, signal.SIGTERM, [], None),
    ("int8/model.ort-cpu.onnx", 1, signal.SIGINT, ["ort:cpu:fp32"], None),
]


@pytest.mark.slow
def test_build_killed_then_rerun(exported, tmp_path):
    build_dir = copy_build(exported, tmp_path)
    args = ["build", str(build_dir)]
    reference = copy_build(exported, tmp_path / "reference")
    started = time.perf_counter()
    assert subprocess.run([TMPDIFF, "build", str(reference)], capture_output=True, timeout=TIMEOUT).returncode == 0
    full = time.perf_counter() - started

    previous: Path | None = None
    for i, (stop_at, nth, sig, engines, named) in enumerate(BUILD_POINTS):
        run, temp = kill_at(args, tmp_path / "runs", f"build{i}", stop_at, nth, sig)
        if previous is not None:
            assert not previous.exists(), f"{previous} from the killed run before survived a re-run"
        assert manifest_state(build_dir) == (["fp32", "int8"], engines)
        assert_check_reports(build_dir, named, f"build stopped before renaming {stop_at} ({sig.name}): "
                             f"exit {run.proc.returncode}")
        previous = temp if temp.exists() else None

    # and the real executable, killed half-way through a build's wall time
    run = start(args, tmp_path / "runs", "timed-build", driver=False)
    try:
        run.finish(0.5 * full)
    except subprocess.TimeoutExpired:
        run.proc.send_signal(signal.SIGKILL)
        run.finish(60)
    code, lines = check(build_dir)
    report(f"build killed at 50% of {full:.1f} s (SIGKILL): exit {run.proc.returncode}; check exit {code}: {lines or 'ok'}")
    assert_nothing_half_written(build_dir)

    final = subprocess.run([TMPDIFF, *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert final.returncode == 0 and "Traceback" not in final.stderr, final.stderr
    assert manifest_state(build_dir) == (["fp32", "int8"], ["ort:cpu:fp32", "ort:cpu:int8"])
    assert temps(build_dir) == []
    assert check(build_dir) == (0, [])


@pytest.mark.slow
def test_concurrent_builds_are_serialised(exported, tmp_path):
    """First build stopped inside the lock; the second waits on the lock, then finds the first one's engines current."""
    build_dir = copy_build(exported, tmp_path)
    args = ["build", str(build_dir)]
    lock = build_dir / ".lock"
    first = start(args, tmp_path / "runs", "first", stop_at="fp32/model.ort-cpu.onnx")
    second = None
    try:
        wait_for(lambda: first.marker.exists() or first.proc.poll() is not None, "the first build to hold the lock")
        assert first.marker.exists(), first.stderr()
        second = start(args, tmp_path / "runs", "second")
        wait_for(lambda: f"not acquired on {lock}" in second.stderr() or second.proc.poll() is not None,
                 "the second build to wait on the lock")
        assert second.proc.poll() is None, second.stderr()
        assert "building" not in second.stderr() and "up to date" not in second.stderr()
        assert manifest_state(build_dir) == (["fp32", "int8"], [])  # nothing written while the first is stopped

        first.release.touch()
        assert first.finish() == 0, first.stderr()
        assert second.finish() == 0, second.stderr()
    finally:
        for run in (first, second):
            if run is not None and run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
    assert [line.split("\t")[:2] for line in first.stdout().splitlines()] == [["fp32", "built"], ["int8", "built"]]
    assert [line.split("\t")[:2] for line in second.stdout().splitlines()] == [["fp32", "up to date"],
                                                                               ["int8", "up to date"]]
    report(f"second build polled the held lock {second.stderr().count('not acquired on')} times, then found both engines "
           "up to date")
    assert manifest_state(build_dir) == (["fp32", "int8"], ["ort:cpu:fp32", "ort:cpu:int8"])
    assert check(build_dir) == (0, [])
