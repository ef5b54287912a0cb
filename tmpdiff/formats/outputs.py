"""Where a command may write: every output path is checked once, before any work starts.

Rules (the same for every command):
- never onto something that is not a regular file: a FIFO, a device, a socket; a file output never onto a
  directory, a directory output never onto a file;
- never onto an input of the same command, never onto another output of it, never into the files a build
  directory manages (its manifest, lock, and everything under a precision's folder or named by the manifest);
- an existing file (or a non-empty output directory) is kept unless the user passed --force;
- a symbolic link is written through (its target replaced) only with --force, and never among an output folder's
  files (they are replaced in place);
- a file's extension matches what is written into it.
Writes themselves stay atomic (`formats.atomic`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tmpdiff.formats.atomic import LOCK_NAME, OWNER_NAME, guard_writes, read_json_object
from tmpdiff.formats.errors import TmpdiffError


@dataclass(frozen=True)
class Output:
    """One output a command will write: which option named it, and what it is."""

    option: str  # e.g. "--out"
    path: Path
    suffixes: tuple[str, ...] = ()  # allowed extensions of a file output, lower case with the dot
    directory: bool = False  # a folder the command writes several files into
    writes: tuple[str, ...] = ()  # a folder's files known before the work (checked like file outputs)

    @classmethod
    def file(cls, option: str, path: str | Path, *suffixes: str) -> Output:
        return cls(option, Path(path), tuple(s.lower() for s in suffixes))

    @classmethod
    def folder(cls, option: str, path: str | Path, writes: tuple[str, ...] = ()) -> Output:
        return cls(option, Path(path), directory=True, writes=writes)


def managed_paths(build_dir: Path) -> list[Path]:
    """What a build directory owns: its manifest and lock, each precision's folder, the deployed layer configurations'
    folder, every path its manifest names."""
    from tmpdiff.formats.manifest import MANIFEST_NAME, load_manifest
    from tmpdiff.formats.precisions import PRECISIONS

    root = Path(build_dir).resolve()
    # every precision's folder, recorded or not (an unfinished export's), and the layer configurations' folder
    owned = [root / MANIFEST_NAME, root / LOCK_NAME, root / OWNER_NAME, root / "mixed", *(root / n for n in PRECISIONS)]
    try:
        manifest = load_manifest(build_dir)
    except TmpdiffError:  # a manifest this tmpdiff cannot read (a newer one's): the folders above are still its
        return owned
    owned += [root / name for name in manifest.precisions]
    for entry in manifest.precisions.values():
        owned += [root / rel for rel, _ in entry.files()]
    owned += [root / engine.path for engine in manifest.engines.values()]
    owned += [root / rel for entry in manifest.mixed.values() for rel, _ in entry.files()]
    if manifest.time_embedding_input is not None:
        owned.append(root / manifest.time_embedding_input.own_table)
    return owned + [real for real in map(_resolved_or_none, owned) if real is not None and real not in owned]


def _resolved_or_none(path: Path) -> Path | None:
    """`path` with symlinks followed (a precision folder linked elsewhere is still the build's), None on a loop."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def build_dirs_holding(path: Path) -> list[Path]:
    """The build directories (a folder whose manifest.json says it is a tmpdiff manifest, of any version, valid or
    not) among `path`'s parents."""
    from tmpdiff.formats.manifest import MANIFEST_NAME

    found = []
    for folder in path.parents:
        if (folder / MANIFEST_NAME).is_file():
            try:
                data = read_json_object(folder / MANIFEST_NAME)
            except TmpdiffError:
                continue
            if str(data.get("format", "")).startswith("tmpdiff.manifest"):
                found.append(folder)
    return found


def _resolve(output: Output) -> Path:
    try:
        return output.path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise TmpdiffError(f"{output.option}: cannot follow the path ({exc})", output.path) from None


def _kind(mode: int) -> str | None:
    """The name of a non-regular, non-directory file type (None for regular files and folders)."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


def _check_one(output: Output, force: bool) -> Path:
    """The path to write for one output (a symlink's target with --force), or a TmpdiffError naming the problem."""
    path = output.path
    if output.suffixes and path.suffix.lower() not in output.suffixes:
        raise TmpdiffError(f"{output.option} must end in {' or '.join(output.suffixes)} (that is the format written)", path)
    if path.is_symlink():
        if not force:
            raise TmpdiffError(f"{output.option} is a symbolic link; pass --force to write through to its target "
                               f"({os.readlink(path)})", path)
        path = path.resolve()
        if output.suffixes and path.suffix.lower() not in output.suffixes:  # the bytes land in the target
            raise TmpdiffError(f"{output.option} is a symbolic link to {path}, which must end in "
                               f"{' or '.join(output.suffixes)} (that is the format written)", output.path)
    if not os.path.lexists(path):
        nearest = next(p for p in path.absolute().parents if os.path.lexists(p))  # "/" always exists
        if not nearest.is_dir():
            raise TmpdiffError(f"{output.option}: {nearest} is not a directory", path)
        _check_writable(output.option, nearest, path)
        return path
    mode = os.stat(path).st_mode
    kind = _kind(mode)
    if kind is not None:
        raise TmpdiffError(f"{output.option} is {kind}, not a regular file; refusing to write there", path)
    if output.directory:
        if not stat.S_ISDIR(mode):
            raise TmpdiffError(f"{output.option} must be a directory, found a file", path)
        if any(path.iterdir()) and not force:
            raise TmpdiffError(f"{output.option} is a directory that is not empty; pass --force to write into it", path)
        _check_writable(output.option, path, path)  # files are made in it
        return path
    if stat.S_ISDIR(mode):
        raise TmpdiffError(f"{output.option} is a directory; name a file", path)
    if not force:
        raise TmpdiffError(f"{output.option} exists; pass --force to replace it", path)
    _check_writable(output.option, path.parent, path)  # the file is replaced by a rename in its folder
    return path


def _check_writable(option: str, folder: Path, path: Path) -> None:
    """Refuse before any work an output whose folder this process cannot write (a read-only mount, /proc, /sys):
    a file is made there and removed, as the write will (permission bits say nothing for root or special mounts)."""
    import tempfile

    try:
        handle, probe = tempfile.mkstemp(prefix=".tmpdiff-probe.", dir=folder)
    except OSError as exc:
        raise TmpdiffError(f"{option}: cannot write in {folder} ({exc.strerror or exc})", path) from None
    os.close(handle)
    os.unlink(probe)


def check_outputs(outputs: Iterable[Output], *, force: bool = False, inputs: Iterable[str | Path | None] = (),
                  build_dirs: Iterable[str | Path] = ()) -> dict[str, Path]:
    """Check every output of a command before it does any work; returns option -> path to write. An input that is a
    directory (a model, a pipeline) takes no output anywhere inside it."""
    outputs = [o for o in outputs if o.path is not None]
    resolved_inputs = {Path(p).resolve(): Path(p) for p in inputs if p is not None}
    input_dirs = {real: given for real, given in resolved_inputs.items() if real.is_dir()}  # a model, a pipeline
    named = [Path(b).resolve() for b in build_dirs]
    owned_by_named = [path for build_dir in named for path in managed_paths(build_dir)]
    chosen: dict[str, Path] = {}
    seen: dict[Path, str] = {}
    new: set[Path] = set()
    for output in outputs:
        real = _resolve(output)  # what would be written, symlinks followed: judged before existence or --force
        # the named build directories, and any other build directory the output would land in
        owned = owned_by_named + [path for build_dir in build_dirs_holding(real) if build_dir not in named
                                  for path in managed_paths(build_dir)]
        files = [(output.option, real)]
        for name in output.writes:
            inside = output.path / name
            if inside.is_symlink():  # the folder's writes replace its files in place; a link would not be written through
                raise TmpdiffError(f"{output.option} ({name}) is a symbolic link ({os.readlink(inside)}): a folder's files "
                                   "are replaced, not written through; remove the link", inside)
            files.append((f"{output.option} ({name})", real / name))
        for option, target in files:
            if target in resolved_inputs:
                raise TmpdiffError(f"{option} is also an input of this command ({resolved_inputs[target]})",
                                   output.path)
            inside = next((given for real_dir, given in input_dirs.items() if target.is_relative_to(real_dir)), None)
            if inside is not None:
                raise TmpdiffError(f"{option} is inside {inside}, an input of this command", output.path)
            if target in seen:
                raise TmpdiffError(f"{option} is the same path as {seen[target]}", output.path)
            for managed in owned:
                if target == managed or target.is_relative_to(managed):
                    raise TmpdiffError(f"{option} would write over files the build directory manages ({managed})",
                                       output.path)
            seen[target] = option
        chosen[output.option] = _check_one(output, force)
        if output.directory:  # its files already there: only a non-empty folder gets here, and only with --force
            for name in output.writes:
                if os.path.lexists(chosen[output.option] / name):
                    _check_one(Output.file(f"{output.option} ({name})", chosen[output.option] / name), force=True)
        if not output.directory and not force and not os.path.lexists(chosen[output.option]):
            new.add(real)
    guard_writes(set(resolved_inputs), new)
    return chosen
