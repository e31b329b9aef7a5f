"""Atomic outputs: build beside the target under a recognisable temporary name, fsync, rename."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from loramerge.errors import LoramergeError, OutputError, opt

TEMP_MARK = ".loramerge-tmp-"
OLD_MARK = ".loramerge-old-"
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically
_AT_FDCWD = -100


def temp_name(out: Path, pid: int | None = None) -> Path:
    """Where the output for `out` is built: a hidden sibling that names the owning process."""
    return out.parent / f".{out.name}{TEMP_MARK}{os.getpid() if pid is None else pid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True


def leftovers(out: Path) -> list[Path]:
    """Temporary siblings of OUT left by runs that were killed (their process is gone)."""
    found = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return []
    for candidate in siblings:
        # plain prefix tests, not glob: OUT's own name may hold [, * or ?
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
    if not root.is_dir():
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


def check_tree(temp: Path, out: Path) -> None:
    """Re-read what was written before it is renamed into place: the header of every safetensors
    file is validated again, against the size the file really has on disk."""
    from loramerge.io.safetensors_header import read_header

    if temp.is_dir():
        files = sorted(p for p in temp.rglob("*.safetensors") if p.is_file())
    else:
        files = [temp] if out.suffix == ".safetensors" else []
    for path in files:
        try:
            read_header(path)
        except LoramergeError as exc:
            shown = out / path.relative_to(temp) if path != temp else out
            raise OutputError(
                f"a written file failed its check, nothing was put in place: {exc.message}",
                file=shown,
            ) from None


def check_output_target(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse OUT when it cannot be replaced as a whole (the working folder, one of its parents,
    a mount point), when it is, lies inside, or contains an input, or when it exists without
    `force`."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or os.path.ismount(resolved):
        where = "the folder you are working in" if resolved == cwd else "a folder that holds it"
        if os.path.ismount(resolved) and resolved != cwd:
            where = "a mount point"
        raise OutputError(
            f"is {where}: loramerge writes OUT as a whole and renames it into place, so it "
            "cannot be a folder that stays in use",
            file=out,
            hint="name a new folder or file inside it, e.g. ./merged",
        )
    for source in inputs:
        source = source.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise OutputError(
                f"the output would overwrite, contain or sit inside the input {source}",
                file=out,
                hint="choose an output path outside every input",
            )
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError("already exists", file=out, hint=f"pass {opt('force')} to replace it")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where it is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # this filesystem cannot swap: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def _put_in_place(temp: Path, out: Path) -> None:
    """Make the finished `temp` appear at `out`, so that OUT is always either the old or the
    whole new output."""
    parent = out.parent
    replacing = out.exists() or out.is_symlink()
    if not replacing or (temp.is_file() and (out.is_symlink() or not out.is_dir())):
        os.replace(temp, out)  # nothing there, or a file over a file or link: one rename
    elif not _exchange(temp, out):
        # rename(2) cannot replace a non-empty folder and this filesystem cannot swap: move the
        # old output aside first (a crash between the two renames leaves it under OLD_MARK)
        old = parent / f".{out.name}{OLD_MARK}{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(temp, out)
        except OSError:
            os.replace(old, out)
            raise
    # after a swap, temp holds the old output
    _fsync_path(parent, directory=True)
    remove_path(temp)
    remove_path(parent / f".{out.name}{OLD_MARK}{os.getpid()}")


def short_write_cause(exc: OSError, path: Path) -> OSError:
    """The cause of a short write that a writer reported without one (numpy's tofile says only
    "N requested and M written"): one more byte appended to `path` fails the same way and
    tells why (a full disk, a size limit). `exc` itself when it has its cause, or the probe
    succeeds."""
    if exc.errno is not None:
        return exc
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as cause:
        return cause
    try:
        os.write(fd, b"\0")
    except OSError as cause:
        return cause
    finally:
        os.close(fd)
    return exc


def _output_error(exc: OSError, out: Path) -> OutputError:
    """One message for a failed write that names OUT and the cause; nothing is left behind."""
    reason = exc.strerror or str(exc)
    if exc.errno in _DISK_ERRNOS:
        return OutputError(
            f"writing failed, the disk or a size limit is full ({reason}); nothing was written",
            file=out,
            hint="free some disk space or pick another output folder, then run again",
        )
    if exc.errno in _ACCESS_ERRNOS:
        return OutputError(
            f"cannot be written in {out.parent} ({reason}); nothing was written",
            file=out,
            hint="choose a folder you can write to",
        )
    return OutputError(
        f"writing failed ({reason}); nothing was written",
        file=out,
        hint="check the output folder's permissions and free space",
    )


@contextlib.contextmanager
def atomic_output(out: Path, *, is_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success check it, fsync it and rename it into
    place.

    On any failure the temporary path is removed and `out` is left as it was. Leftovers of
    killed runs for the same `out` (their process is gone) are removed first.
    """
    out = Path(out)
    parent = out.parent
    temp = temp_name(out)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in leftovers(out):
            remove_path(stale)
        remove_path(temp)
        if is_dir:
            temp.mkdir()
    except OSError as exc:
        remove_path(temp)
        raise _output_error(exc, out) from exc
    try:
        yield temp
        check_tree(temp, out)
        fsync_tree(temp)
        _put_in_place(temp, out)
    except OSError as exc:
        remove_path(temp)
        raise _output_error(exc, out) from exc
    except BaseException:
        remove_path(temp)
        raise
