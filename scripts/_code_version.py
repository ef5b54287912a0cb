"""The commit a bench script runs (`git describe`), recorded beside what it measured so a re-run can tell."""

from __future__ import annotations

import subprocess
from pathlib import Path


def code_version() -> str:
    """The commit checked out (`-dirty` with uncommitted changes); "unknown" outside a git checkout."""
    done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    return done.stdout.strip() or "unknown"
