"""User-facing errors: the CLI prints these as one line and exits non-zero."""

from __future__ import annotations

from pathlib import Path


class TmpdiffError(Exception):
    """An expected failure caused by input (a path, a file, an option), not by a bug."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)
