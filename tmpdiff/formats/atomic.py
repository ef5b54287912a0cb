"""Atomic file writes and content hashes, so a crash never leaves a half-written artifact.

In-flight data lives under a hidden temp name beside its target, `.<name>.<writer pid>.<random>.tmp` (a file, or a
directory for multi-file writes), and is renamed into place when complete. A writer killed mid-write (SIGKILL,
SIGTERM) leaves that temp behind; the pid tells such leftovers from writes still in progress.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tmpdiff.formats.errors import TmpdiffError

TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def temp_prefix(name: str) -> str:
    """Prefix of the temp name for writing `name` (pass `suffix=TEMP_SUFFIX` to tempfile as well)."""
    return f".{name}.{os.getpid()}."


@dataclass
class WriteGuard:
    """What the running command's writes must leave alone, set when its outputs are checked (`formats.outputs`):
    its inputs (never replaced, whatever folder output they sit in) and the outputs that did not exist then and were
    not forced (a file that appears there while the command works is kept: the check and the write are minutes
    apart)."""

    inputs: set[Path] = field(default_factory=set)
    new: set[Path] = field(default_factory=set)


_guard = WriteGuard()
_locked_dirs: list[Path] = []  # build directories whose lock this process holds: every write under one stays in it


def check_confined(path: str | Path) -> None:
    """Refuse a write to `path` under a locked build directory (`directory_lock`) that a symbolic link would lead out
    of it: a build's files are written only inside the build directory, never through a link into a user's folder."""
    lexical = Path(os.path.abspath(path))
    for root in _locked_dirs:
        if lexical.is_relative_to(root) and not _real(lexical).is_relative_to(_real(root)):
            raise TmpdiffError(f"a symbolic link leads this path out of the build directory {root}; tmpdiff writes a "
                               "build only inside it: remove the link", path)


def guard_writes(inputs: set[Path], new: set[Path]) -> None:
    """The running command's `WriteGuard` (resolved paths); replaces the previous command's."""
    global _guard
    _guard = WriteGuard(set(inputs), set(new))


def clear_write_guard() -> None:
    """Forget the guard when a command ends (a process may run several: tests, notebooks)."""
    guard_writes(set(), set())


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: nothing a guard holds
        return path.absolute()


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished temp over `final`, as the write guard allows."""
    real = _real(final)
    if real in _guard.inputs:
        raise TmpdiffError("refusing to replace an input of this command with one of its outputs", final)
    if real not in _guard.new:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # no-clobber: fails if a file appeared at `final` since the outputs were checked
    except FileExistsError:
        raise TmpdiffError("this file appeared while the command ran and is kept; pass --force to replace it "
                           "(the command's result was not written)", final) from None
    except OSError:  # a filesystem without hard links: the check is as close to the write as it can be
        if os.path.lexists(final):
            raise TmpdiffError("this file appeared while the command ran and is kept; pass --force to replace it",
                               final) from None
        os.replace(tmp, final)
    _guard.new.discard(real)  # written by this command: a later write of it replaces it


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it over `final` only if the block succeeds (and the running
    command's `WriteGuard` allows)."""
    final = Path(final)
    check_confined(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(final.name), suffix=TEMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts get the usual permissions
        _put_in_place(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def replace_directory(staging: str | Path, final: str | Path) -> None:
    """Put a finished `staging` directory at `final`, replacing what was there: the old one is moved aside first and
    removed after, so `final` is always either the old or the new directory, never a mix."""
    staging, final = Path(staging), Path(final)
    check_confined(final)
    backup = final.with_name(f".{final.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    if final.exists():
        final.rename(backup)
    staging.rename(final)
    shutil.rmtree(backup, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, standard JSON to `path` atomically (NaN and infinities are refused, not written)."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's content."""
    with open(path, "rb") as fh:
        return sha256_of(fh)


def sha256_of(fh: BinaryIO, chunk: int = 1 << 20) -> str:
    """Hex sha256 of what is left to read in an open binary file."""
    digest = hashlib.sha256()
    while block := fh.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def interrupted_writes(directory: str | Path) -> list[Path]:
    """Temp files/directories in `directory` and its direct subdirectories whose writing process is gone."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    folders = [directory, *sorted(p for p in directory.iterdir() if p.is_dir() and not p.is_symlink()
                                  and not _TEMP_NAME.match(p.name))]
    found = []
    for folder in folders:
        for entry in sorted(folder.iterdir()):
            match = _TEMP_NAME.match(entry.name)
            if match and not _process_alive(int(match["pid"])):
                found.append(entry)
    return found


def remove_interrupted_writes(directory: str | Path) -> list[Path]:
    """Delete what `interrupted_writes` finds (the data never reached its final name); return what was removed."""
    removed = interrupted_writes(directory)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


_SCRATCH_NAME = re.compile(r"^tmpdiff-[a-z]+-(?P<pid>\d+)-[^/]+$")


@contextlib.contextmanager
def scratch_directory(kind: str) -> Iterator[Path]:
    """A directory in the system temp dir for the block's scratch files (a traced graph, AutoCast's held weights),
    removed at its end. Its name holds this process's PID, and scratch directories of processes that are gone (a
    killed export: at real size gigabytes each) are removed first, if they are this user's."""
    remove_abandoned_scratch()
    path = Path(tempfile.mkdtemp(prefix=f"tmpdiff-{kind}-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_abandoned_scratch(root: str | Path | None = None) -> list[Path]:
    """Remove `scratch_directory`'s directories in `root` (the system temp dir) whose process is gone; return them."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            match = _SCRATCH_NAME.match(entry.name)
            if match is None or _process_alive(int(match["pid"])):
                continue
            with contextlib.suppress(OSError):
                info = entry.lstat()
                if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
    return removed


LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"  # the holder's PID, written once the lock is held (filelock keeps no owner)


PROBE_SECONDS = 1.0  # how long a probe waits out another probe (readers hold the lock for microseconds)


def lock_holder(directory: str | Path) -> int | None:
    """PID of the tmpdiff process writing `directory` now (None if nobody holds its lock).

    The probe takes the lock for an instant, so two readers probing at once (e.g. Ray actors loading the same
    engines) can see each other; a probe therefore waits up to `PROBE_SECONDS` before calling the lock held."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    if not (directory / LOCK_NAME).exists():
        return None
    try:
        with FileLock(str(directory / LOCK_NAME), timeout=PROBE_SECONDS):
            return None
    except Timeout:
        owner = _owner_pid(directory)
        return -1 if owner is None else owner  # -1: held, but the holder has not written its PID yet
    except OSError:  # a read-only build (a deployment's mount) or another user's lock file: ask the owner file
        owner = _owner_pid(directory)
        return owner if owner is not None and _process_alive(owner) else None


def _owner_pid(directory: Path) -> int | None:
    """The PID in the lock's owner file; None without one (or with anything but a regular file there: a FIFO would
    block the read)."""
    path = directory / OWNER_NAME
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_owner(directory: Path) -> None:
    """Record this process as the lock's holder. The owner file is the build's own: a symlink, FIFO or device put at
    its name is replaced, never written through (or blocked on)."""
    path = directory / OWNER_NAME
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        if os.path.isdir(path) and not os.path.islink(path):
            raise TmpdiffError("the lock's owner file is a directory: remove it", path)
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")


@contextlib.contextmanager
def directory_lock(directory: str | Path, timeout: float = 3600.0,
                   on_wait: Callable[[str], None] = lambda _: None) -> Iterator[None]:
    """Serialise writers of one build directory (two exports or builds at once wait, never interleave).

    A writer that has to wait says so through `on_wait`, naming the holder's PID. Once the lock is held, temps
    left by killed writers are removed, so a re-run needs no manual clean-up.
    """
    from filelock import FileLock, Timeout

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(directory / LOCK_NAME), timeout=timeout)
        lock.acquire(timeout=0)
    except Timeout:  # (a TimeoutError, so an OSError: caught first)
        holder = lock_holder(directory)
        on_wait(f"waiting for PID {holder if holder and holder > 0 else '?'}, which is writing {directory} "
                f"(at most {timeout:.0f} s; --wait sets the limit)")
        try:
            lock.acquire()
        except Timeout:
            raise TmpdiffError(f"another tmpdiff process (PID {holder}) still holds the lock after {timeout:.0f} s",
                               directory / LOCK_NAME) from None
    except OSError as exc:  # a read-only or foreign folder
        raise TmpdiffError(f"cannot write the build directory ({exc.strerror or exc})", directory) from None
    _locked_dirs.append(Path(os.path.abspath(directory)))
    try:
        _write_owner(directory)
        remove_interrupted_writes(directory)
        yield
    finally:
        _locked_dirs.pop()
        (directory / OWNER_NAME).unlink(missing_ok=True)
        lock.release()


MAX_TEXT_BYTES = 256 * 2**20  # JSON and prompt files tmpdiff reads are kilobytes to megabytes


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A regular file's text: a FIFO, device or directory (which would block or never end) and anything past
    MAX_TEXT_BYTES are refused naming the path; unreadable or non-UTF-8 bytes too."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise TmpdiffError(f"cannot read the {what} ({exc.strerror or exc})", path) from None
    if not stat.S_ISREG(info.st_mode):
        raise TmpdiffError(f"the {what} is not a regular file", path)
    if info.st_size > MAX_TEXT_BYTES:
        raise TmpdiffError(f"the {what} is {info.st_size / 2**20:.0f} MiB, more than any tmpdiff {what} "
                           f"({MAX_TEXT_BYTES // 2**20} MiB)", path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TmpdiffError(f"cannot read the {what} ({exc.strerror or exc})", path) from None
    except UnicodeDecodeError as exc:
        raise TmpdiffError(f"not valid UTF-8 text ({exc})", path) from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; anything else is a TmpdiffError naming the file."""
    return parse_json_object(read_text_file(path), path)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:  # parsers disagree on which one counts (Python's: the last), so neither does
            raise ValueError(f"key {key!r} appears twice in one object")
        obj[key] = value
    return obj


def loads_strict(data: str | bytes) -> Any:
    """`json.loads`, refusing an object with a key twice. Raises ValueError for anything it cannot read (JSON syntax,
    bad UTF-8, an integer past Python's digit limit)."""
    return json.loads(data, object_pairs_hook=_no_duplicate_keys)


def parse_json_object(data: str | bytes, path: Path, what: str = "") -> dict[str, Any]:
    """`data` (text, or UTF-8 bytes) parsed as a JSON object; anything else is a TmpdiffError naming `path` (`what`:
    which part of the file it is, e.g. "safetensors header: ")."""
    try:
        parsed = loads_strict(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a duplicate key, too many digits
        raise TmpdiffError(f"{what}not valid JSON ({exc})", path) from None
    except RecursionError:
        raise TmpdiffError(f"{what}not a valid JSON document: nested too deeply", path) from None
    if not isinstance(parsed, dict):
        raise TmpdiffError(f"{what}expected a JSON object, found {type(parsed).__name__}", path)
    return parsed


def read_model_file(path: Path, model_cls, what: str, missing: str | None = None):
    """Validate a JSON file against a pydantic model; a bad file is a TmpdiffError naming it and its first problems,
    an absent one too when `missing` says what to call it ("costs file")."""
    from pydantic import ValidationError

    if missing is not None and not path.is_file():
        raise TmpdiffError(f"{missing} {'is not a regular file' if path.exists() else 'does not exist'}", path)
    try:
        data = loads_strict(read_text_file(path, what))
        if isinstance(data, dict) and "format" in model_cls.model_fields and "format" not in data:
            raise TmpdiffError(f"not a valid {what} (no 'format' field)", path)
        where = _non_finite_at(data)  # tmpdiff writes standard JSON: NaN / Infinity are hand edits or other tools'
        if where is not None:
            raise TmpdiffError(f"not a valid {what} ({where or 'document'}: NaN or Infinity, which standard JSON does "
                               "not allow)", path)
        return model_cls.model_validate(data)
    except ValidationError as exc:
        given = data.get("format") if isinstance(data, dict) else None
        if isinstance(given, str) and given.startswith("tmpdiff.") and any(e["loc"] == ("format",) for e in exc.errors()):
            raise TmpdiffError(_format_mismatch(given, model_cls, what), path) from None
        raise TmpdiffError(f"not a valid {what} ({validation_problems(exc)})", path) from None
    except ValueError as exc:  # JSON syntax, bad UTF-8, a duplicate key, too many digits (ValidationError is one too)
        raise TmpdiffError(f"not valid JSON ({exc})", path) from None
    except RecursionError:
        raise TmpdiffError("not a valid JSON document: nested too deeply", path) from None


def _format_mismatch(given: str, model_cls, what: str) -> str:
    """Another tmpdiff file kind given where `what` is read (a schedule as a plan), or a version this one cannot read."""
    accepted = [str(a) for a in typing.get_args(model_cls.model_fields["format"].annotation)]
    if given.split("/")[0] in {a.split("/")[0] for a in accepted}:
        return f"format {given} is not one this tmpdiff reads ({', '.join(accepted)}): written by a newer tmpdiff?"
    return f"a {given} file, not a {what}"


def _non_finite_at(data: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinite number in parsed JSON ("" for the document itself), else None."""
    if isinstance(data, float) and not math.isfinite(data):
        return where
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = _non_finite_at(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def validation_problems(exc) -> str:
    """The first problems of a pydantic ValidationError, one clause each."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'document'}: {e['msg']}" for e in exc.errors()[:3])
