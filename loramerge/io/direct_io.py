"""Unbuffered file I/O (O_DIRECT) for streaming whole models through memory once.

A merge reads every byte of the base once and writes every byte of the output once, so the page
cache only adds work: the kernel copies each byte from the disk's pages into our buffer, and
again from our buffer into fresh pages of the output, and keeps gigabytes of pages nobody reads
again. With O_DIRECT the disk reads into and writes from our own (reused) buffers. On the 2-vCPU
benchmark machine that removed about 9 s of the 10 s of system time of a 2.2 GB merge.

Direct transfers need block-aligned file offsets, lengths and memory; everything here works in
BLOCK units and falls back to ordinary buffered I/O where a file system refuses O_DIRECT (tmpfs,
some network and FUSE file systems) or the platform has none.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy

if TYPE_CHECKING:
    import torch

try:
    import fcntl
except ImportError:  # Windows: it has no O_DIRECT either, so the direct paths stay off
    fcntl = None  # type: ignore[assignment]

BLOCK = 4096  # a multiple of every common logical block size (512 and 4096)
O_DIRECT = getattr(os, "O_DIRECT", 0) if fcntl is not None else 0
# ranges smaller than this are not worth a direct transfer (alignment padding, no copy saved)
MIN_DIRECT_BYTES = 256 << 10
# a range this much in the page cache is read through it: memory is faster than the disk
CACHED_SHARE = 0.9


def aligned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of nbytes whose data starts on a BLOCK boundary."""
    import torch

    raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8)
    shift = -raw.data_ptr() % BLOCK
    return raw[shift : shift + nbytes]


def aligned_array(nbytes: int) -> numpy.ndarray:
    """`aligned_empty` as a numpy array, for the torch-free paths."""
    raw = numpy.empty(nbytes + BLOCK, dtype=numpy.uint8)
    shift = -raw.ctypes.data % BLOCK
    return raw[shift : shift + nbytes]


# where buffers come from: `nbytes` -> an uninitialised, BLOCK-aligned uint8 tensor or array
Allocate = Callable[[int], Any]


def as_memoryview(buffer: Any) -> memoryview:
    """The bytes of a contiguous uint8 tensor or numpy array, writable, without a copy."""
    if isinstance(buffer, numpy.ndarray):
        return memoryview(buffer) if buffer.size else memoryview(bytearray())
    return memoryview(buffer.numpy()) if buffer.numel() else memoryview(bytearray())


def set_direct(fd: int, enabled: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT if enabled else flags & ~O_DIRECT)


def try_set_direct(fd: int) -> bool:
    """Switch an open descriptor to O_DIRECT; False where the platform or file system refuses."""
    if not O_DIRECT:
        return False
    try:
        set_direct(fd, True)
    except OSError:
        return False
    return True


def reopen_direct(fd: int) -> int | None:
    """A second, O_DIRECT descriptor of the very file `fd` has open (not of its path, which may
    have changed since), or None where direct reads are unavailable."""
    if not O_DIRECT or not sys.platform.startswith("linux"):
        return None
    try:
        direct = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None
    opened, original = os.fstat(direct), os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (original.st_dev, original.st_ino):
        os.close(direct)
        return None
    return direct


def _cachestat():
    """Linux's cachestat(2) (6.5+) through libc's syscall(), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    return syscall


_SYSCALL = _cachestat()
_CACHESTAT = 451  # the same number on every architecture (added after the tables were unified)


def cached_share(fd: int, offset: int = 0, length: int = 0) -> float | None:
    """Share of a file range's pages in the page cache (length 0: to the end), without reading
    anything; None where the kernel cannot say."""
    if _SYSCALL is None:
        return None
    span = (ctypes.c_uint64 * 2)(offset, length)
    stats = (ctypes.c_uint64 * 5)()
    if _SYSCALL(_CACHESTAT, ctypes.c_uint(fd), span, stats, ctypes.c_uint(0)) != 0:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    end = offset + length if length else os.fstat(fd).st_size
    pages = -(-end // page) - offset // page
    return min(1.0, stats[0] / pages) if pages > 0 else 1.0


def read_exact(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset`; returns the bytes read (fewer only at the end of the file)."""
    done = 0
    while done < view.nbytes:
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done


class DirectRangeReader:
    """Reads byte ranges of one open file into fresh tensors straight from the disk, except
    ranges already in the page cache (a warm file): those are left to an ordinary read, since
    memory is faster than the disk."""

    def __init__(self, fd: int, allocate: Allocate = aligned_empty) -> None:
        self._fd = fd
        self._allocate = allocate
        self._direct = reopen_direct(fd)

    @property
    def direct(self) -> bool:
        return self._direct is not None

    def close(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None

    def read(self, offset: int, length: int) -> Any:
        """`length` bytes at `offset` as a uint8 tensor (or array, as allocated), or None when
        this range should be read the ordinary way (too small, cached, no direct descriptor,
        or refused by the file system)."""
        if self._direct is None or length < MIN_DIRECT_BYTES:
            return None
        share = cached_share(self._fd, offset, length)
        if share is not None and share >= CACHED_SHARE:
            return None
        start = offset - offset % BLOCK
        stop = -(-(offset + length) // BLOCK) * BLOCK
        buffer = self._allocate(stop - start)
        try:
            got = read_exact(self._direct, as_memoryview(buffer), start)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.close()  # this file system takes no direct reads after all
            return None
        if got < offset + length - start:
            return None  # the file ended early: the ordinary read reports it
        return buffer[offset - start : offset - start + length]


def write_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of `view` at `offset`; a direct write the file system refuses (EINVAL) is
    retried, and the rest of the file written, through the page cache."""
    done = 0
    while done < view.nbytes:
        try:
            done += os.pwritev(fd, [view[done:]], offset + done)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not O_DIRECT:
                raise
            if not fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
                raise
            set_direct(fd, False)


def direct_writes_work(folder: str | os.PathLike[str]) -> bool:
    """Whether files in `folder` take O_DIRECT writes (a probe file is written and removed)."""
    probe = os.path.join(folder, f".direct-probe-{os.getpid()}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if not try_set_direct(fd):
            return False
        block = aligned_array(BLOCK)
        block.fill(0)
        return os.pwritev(fd, [memoryview(block)], 0) == BLOCK
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)
