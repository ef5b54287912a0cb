"""sha256 of a model's large weight files, remembered across processes by file identity.

Every command that checks a build against its model (`run --pipeline`, `calibrate --pipeline`, export's "same
model?") hashes the model's weights: gigabytes for a real checkpoint, read again at every command. The digest of a
file of at least `MIN_CACHED_BYTES` is kept in the user's cache directory under the file's identity: device, inode,
size, modification and change time. Writing a file changes its change time, which no user tool can set back, so a
rewritten checkpoint (even one copied over with its old modification time) is hashed again. This relies on the
filesystem reporting accurate inode numbers and change times, as local Linux filesystems do; where it may not (NFS
with attribute caching, CIFS without server inode numbers, Windows, whose st_ctime is the creation time), set
TMPDIFF_HASH_CACHE=0 to hash every time. The cache must be as private as the user's home: whoever can write it can
make one model pass for another. The build's own artifacts are never looked up here: they are verified against their
recorded hashes in full.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from stat import S_ISREG

from tmpdiff.formats.atomic import sha256_of, write_json

CACHE_ENV = "TMPDIFF_CACHE_DIR"  # where the cache lives (default: $XDG_CACHE_HOME/tmpdiff, else ~/.cache/tmpdiff)
SWITCH_ENV = "TMPDIFF_HASH_CACHE"  # "0": never read or write the cache
CACHE_NAME = "weights-sha256.json"
FORMAT = "tmpdiff.weights-sha256/1"
MIN_CACHED_BYTES = 64 << 20  # smaller files are hashed in well under a second
MAX_ENTRIES = 256
MAX_CACHE_BYTES = 1 << 20  # 256 entries take about 60 KB
RACY_NS = 2_000_000_000  # a change time this recent may not have moved yet on a coarse-timestamp filesystem
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
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        if before.st_size < MIN_CACHED_BYTES or os.environ.get(SWITCH_ENV, "1") == "0":
            return sha256_of(fh)
        key, identity = str(path.resolve()), _identity(before)
        entries = _read()
        known = entries.get(key)
        if isinstance(known, dict) and known.get("identity") == identity:
            return known["sha256"]
        digest = sha256_of(fh)
        after = os.fstat(fh.fileno())
    # remembered only for a file that did not change while it was read and whose change time is old enough that a
    # write within the filesystem's timestamp granularity would have moved it (git's "racy" rule)
    if _identity(after) == identity and time.time_ns() - after.st_ctime_ns > RACY_NS:
        entries.pop(key, None)
        entries[key] = {"identity": identity, "sha256": digest}
        _write(dict(list(entries.items())[-MAX_ENTRIES:]))
    return digest


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _read() -> dict:
    """The cached entries that are well formed; an absent, unreadable, odd or foreign file is an empty cache (it only
    ever saves time)."""
    try:
        path = cache_file()
        stat = path.stat()
        if not S_ISREG(stat.st_mode) or stat.st_size > MAX_CACHE_BYTES:  # a FIFO would block, a huge file stall
            return {}
        data = json.loads(path.read_text())
        files = data["files"] if isinstance(data, dict) and data.get("format") == FORMAT else {}
        return {key: entry for key, entry in files.items() if _well_formed(entry)}
    except Exception:  # noqa: BLE001 - whatever is in the file (deep nesting, no home directory): hash instead
        return {}


def _well_formed(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and bool(_SHA256.fullmatch(entry["sha256"]))
            and isinstance(entry.get("identity"), list) and len(entry["identity"]) == 5
            and all(type(v) is int for v in entry["identity"]))


def _write(entries: dict) -> None:
    try:
        write_json(cache_file(), {"format": FORMAT, "files": entries})
    except Exception:  # noqa: BLE001 - a read-only home or cache: the next command hashes again
        pass
