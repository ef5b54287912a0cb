"""Running the CLI in this process for tests: exit code, stdout and stderr."""

from __future__ import annotations

import contextlib
import io
import subprocess

from tmpdiff.cli import main


def cli(*args) -> tuple[int, str, str]:
    """`tmpdiff ARGS` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args], own_process=False)  # no process-wide ORT pool in pytest
        except SystemExit as exc:  # typer's own usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def cli_run(*args) -> subprocess.CompletedProcess:
    """`tmpdiff ARGS` in this process, as `subprocess.run(..., capture_output=True, text=True)` would report it (a fresh
    process spends ~3.5 s importing; tests of the process itself use the executable)."""
    code, out, err = cli(*args)
    return subprocess.CompletedProcess([str(a) for a in args], code, out, err)
