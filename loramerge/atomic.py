"""Atomic outputs: build beside the target under a recognisable temporary name, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from loramerge.errors import OutputError

TEMP_MARK = ".loramerge-tmp-"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EFBIG}
OLD_MARK = ".loramerge-old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(out: Path) -> list[Path]:
    """Temporary siblings of OUT left by runs that were killed (their process is gone)."""
    found = []
    for candidate in out.parent.glob(f".{out.name}*"):
        for mark in (TEMP_MARK, OLD_MARK):
            prefix = f".{out.name}{mark}"
            if candidate.name.startswith(prefix):
                pid_text = candidate.name[len(prefix) :].split("-")[0]
                if not pid_text.isdigit() or not _pid_alive(int(pid_text)):
                    found.append(candidate)
    return sorted(found)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_tree(root: Path) -> None:
    """fsync every file below root, then every folder, children before parents."""
    if root.is_file():
        _fsync_path(root)
        return
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder), directory=True)


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_target(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse OUT when it is, or lies inside, an input, or exists without --force."""
    resolved = out.resolve()
    for source in inputs:
        source = source.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise OutputError(
                f"the output would overwrite or sit inside the input {source}",
                path=out,
                hint="choose an output path outside every input",
            )
    if out.exists() and not force:
        raise OutputError("already exists", path=out, hint="pass --force to replace it")


@contextlib.contextmanager
def atomic_output(out: Path, *, is_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success fsync it and rename it into place.

    On any failure the temporary path is removed and `out` is left as it was. A previous `out`
    (replaced with --force) is moved aside and deleted only after the new one is in place.
    """
    out = Path(out)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder ({exc.strerror})", path=parent) from None
    for stale in leftovers(out):
        remove_path(stale)
    temp = parent / f".{out.name}{TEMP_MARK}{os.getpid()}"
    remove_path(temp)
    if is_dir:
        temp.mkdir()
    try:
        yield temp
        fsync_tree(temp)
        old = None
        if out.exists() or out.is_symlink():
            old = parent / f".{out.name}{OLD_MARK}{os.getpid()}"
            os.replace(out, old)
        os.replace(temp, out)
        _fsync_path(parent, directory=True)
        if old is not None:
            remove_path(old)
    except OSError as exc:
        remove_path(temp)
        if exc.errno in _WRITE_ERRNOS:
            raise OutputError(
                f"writing failed: {exc.strerror}",
                path=out,
                hint="check free disk space and permissions",
            ) from exc
        raise
    except BaseException:
        remove_path(temp)
        raise
