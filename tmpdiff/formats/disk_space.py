"""Free disk space checked before a large write, so a full disk is a one-line refusal, not a failure after the work.

Writes that go to two places (a build dir and the system temp dir) may share one filesystem: the need is summed per
device before it is compared with what that device has free.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tmpdiff.formats.errors import TmpdiffError

GB = 1e9


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent: where a directory that is not made yet will live."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still use on the filesystem holding `path` (or where it will be made)."""
    return shutil.disk_usage(_existing(path)).free


def require_free_space(needs: list[tuple[Path, float, str]], what: str, hint: str = "") -> None:
    """Refuse `what` unless every filesystem has room for what is planned on it: `needs` lists (where, bytes,
    which files), summed per device. The error names each short filesystem, the bytes planned and free."""
    by_device: dict[int, tuple[Path, float, list[str]]] = {}
    for where, nbytes, label in needs:
        device = os.stat(_existing(where)).st_dev
        place, total, labels = by_device.get(device, (where, 0.0, []))
        by_device[device] = (place, total + nbytes, [*labels, label])
    short = [(place, total, labels) for place, total, labels in by_device.values() if total > free_bytes(place)]
    if short:
        problems = "; ".join(f"{' + '.join(labels)} need about {total / GB:.1f} GB on the filesystem of {place}, "
                             f"{free_bytes(place) / GB:.1f} GB is free" for place, total, labels in short)
        raise TmpdiffError(f"not enough disk space for {what}: {problems}{'; ' + hint if hint else ''}", short[0][0])
