"""sha256 of a model's large weight files, remembered across processes by file identity.

Every command that checks a build against its model (`run --pipeline`, `calibrate --pipeline`, export's "same
model?") hashes the model's weights: gigabytes for a real checkpoint, read again at every command. The digest of a
file of at least `MIN_CACHED_BYTES` is kept in the user's cache directory under the file's identity: device, inode,
size, modification and change time. Writing a file changes its change time, which no user tool can set back, so a
rewritten checkpoint (even one copied over with its old modification time) is hashed again. The build's own artifacts
are never looked up here: they are verified against their recorded hashes in full.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tmpdiff.formats.atomic import sha256_file, write_json
from tmpdiff.formats.errors import TmpdiffError

CACHE_ENV = "TMPDIFF_CACHE_DIR"  # where the cache lives (default: $XDG_CACHE_HOME/tmpdiff, else ~/.cache/tmpdiff)
CACHE_NAME = "weights-sha256.json"
FORMAT = "tmpdiff.weights-sha256/1"
MIN_CACHED_BYTES = 64 << 20  # smaller files are hashed in well under a second
MAX_ENTRIES = 256
_SHA256 = re.compile(r"[0-9a-f]{64}")


def cache_file() -> Path:
    """The cache's path."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / CACHE_NAME
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tmpdiff" / CACHE_NAME


def weights_sha256(path: Path) -> str:
    """Hex sha256 of a weight file's content, from the cache when the file is the one hashed before."""
    stat = path.stat()
    if stat.st_size < MIN_CACHED_BYTES:
        return sha256_file(path)
    key = str(path.resolve())
    identity = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    entries = _read()
    known = entries.get(key)
    if isinstance(known, dict) and known.get("identity") == identity and _SHA256.fullmatch(str(known.get("sha256"))):
        return known["sha256"]
    digest = sha256_file(path)
    entries.pop(key, None)
    entries[key] = {"identity": identity, "sha256": digest}
    _write(dict(list(entries.items())[-MAX_ENTRIES:]))
    return digest


def _read() -> dict:
    """The cached entries; an absent, unreadable or foreign file is an empty cache (it only ever saves time)."""
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write(entries: dict) -> None:
    try:
        write_json(cache_file(), {"format": FORMAT, "files": entries})
    except (OSError, TmpdiffError):  # a read-only home or cache: the next command hashes again
        pass
