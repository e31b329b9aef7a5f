"""Output files written as fixed chunks that fill in any order, with positioned writes.

Where each tensor's bytes go is known before any is computed (the header fixes every offset), so
several threads can fill one file at once: the file is cut into chunks of CHUNK bytes at
block-aligned offsets, whoever produces bytes writes them straight into the chunk buffers they
fall in, and a chunk is written to the disk (O_DIRECT where the file system takes it) as soon as
all its bytes are there, whatever the order. Chunk buffers are handed out only within a window of
`window` chunks from the first one not yet written, which bounds memory and keeps the earliest
work from ever waiting on later work. Numpy buffers, no torch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy

from loramerge.io.direct_io import BLOCK, aligned_array, try_set_direct, write_all

CHUNK = 8 << 20


class ArrayPool:
    """Block-aligned uint8 numpy buffers of one size, reused; `give` takes any view of one."""

    def __init__(self, size: int) -> None:
        self.size = -(-max(size, 1) // BLOCK) * BLOCK
        self._free: list[numpy.ndarray] = []
        self._lent: dict[int, numpy.ndarray] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> numpy.ndarray:
        if nbytes > self.size:
            raise ValueError(f"{nbytes} bytes asked of a pool of {self.size}-byte buffers")
        with self._lock:
            buffer = self._free.pop() if self._free else aligned_array(self.size)
            self._lent[id(_owner(buffer))] = buffer
        return buffer[:nbytes]

    def give(self, view: numpy.ndarray) -> None:
        with self._lock:
            found = self._lent.pop(id(_owner(view)), None)
            if found is not None:
                self._free.append(found)

    @property
    def lent(self) -> int:
        with self._lock:
            return len(self._lent)


def _owner(view: numpy.ndarray) -> numpy.ndarray:
    """The array that owns a view's memory (numpy points every view at it)."""
    return view if view.base is None else view.base


class ShardFile:
    """One output file: whole blocks written with O_DIRECT where possible, a last partial
    block through the page cache."""

    def __init__(self, path: Path, size: int, direct: bool) -> None:
        self.path, self.size = path, size
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(path, flags, 0o644)
        self.direct = direct and try_set_direct(self.fd)
        self._tail_fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))

    def write(self, data: memoryview, offset: int) -> None:
        whole = data.nbytes - data.nbytes % BLOCK if self.direct else data.nbytes
        if whole:
            write_all(self.fd if self.direct else self._tail_fd, data[:whole], offset)
        if whole < data.nbytes:
            write_all(self._tail_fd, data[whole:], offset + whole)

    def finish(self) -> None:
        """Sync the file to the disk and close it."""
        os.fsync(self._tail_fd)
        self.close()

    def close(self) -> None:
        for fd in (self.fd, self._tail_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._tail_fd = -1


@dataclass(frozen=True)
class Piece:
    """Part of a run of output bytes that falls in one chunk."""

    chunk: int  # the chunk's number over all files
    start: int  # where in the chunk
    length: int
    source: int  # where in the run of bytes


class ChunkedFiles:
    """The chunks of several output files, numbered one after the other over the files.

    `pieces` says where a run of bytes goes, `buffer` lends a chunk's buffer (waiting while the
    chunk is beyond the window), `filled` records bytes put in it and writes the chunk once
    full. `finish` waits for every write and syncs the files. The first failure of a write is
    raised by the next call.
    """

    def __init__(
        self,
        files: list[ShardFile],
        window: int = 8,
        writers: int = 2,
        on_written: Callable[[int], None] | None = None,
    ) -> None:
        self.files = files
        self._on_written = on_written
        self._first = [0]  # number of each file's first chunk
        for found in files:
            self._first.append(self._first[-1] + max(1, -(-found.size // CHUNK)))
        self._window = max(2, window)
        self._buffers: dict[int, numpy.ndarray] = {}
        self._filled: dict[int, int] = {}
        self._done: set[int] = set()
        self._earliest = 0  # first chunk not yet written
        self._spare: list[numpy.ndarray] = []
        self._state = threading.Condition()
        self._disk = ThreadPoolExecutor(writers, thread_name_prefix="loramerge-write")
        self._pending: list[Future] = []
        self._error: BaseException | None = None
        self.written = 0

    def pieces(self, file: int, offset: int, length: int) -> list[Piece]:
        found, position = [], 0
        while position < length:
            index, start = divmod(offset + position, CHUNK)
            take = min(CHUNK - start, length - position)
            found.append(Piece(self._first[file] + index, start, take, position))
            position += take
        return found

    def buffer(self, chunk: int) -> numpy.ndarray:
        with self._state:
            while chunk >= self._earliest + self._window and self._error is None:
                self._state.wait()
            self._raise()
            if chunk not in self._buffers:
                spare = self._spare.pop() if self._spare else aligned_array(CHUNK)
                self._buffers[chunk] = spare
            return self._buffers[chunk]

    def filled(self, chunk: int, nbytes: int) -> None:
        with self._state:
            self._raise()
            self._filled[chunk] = self._filled.get(chunk, 0) + nbytes
            if self._filled[chunk] == self._chunk_size(chunk):
                self._pending.append(self._disk.submit(self._write, chunk))

    def _locate(self, chunk: int) -> tuple[int, int]:
        file = next(i for i in range(len(self.files)) if chunk < self._first[i + 1])
        return file, (chunk - self._first[file]) * CHUNK

    def _chunk_size(self, chunk: int) -> int:
        file, offset = self._locate(chunk)
        return min(CHUNK, self.files[file].size - offset)

    def _write(self, chunk: int) -> None:
        file, offset = self._locate(chunk)
        buffer = self._buffers[chunk]
        size = self._chunk_size(chunk)
        try:
            self.files[file].write(memoryview(buffer)[:size], offset)
        except BaseException as exc:
            with self._state:
                self._error = self._error or exc
                self._state.notify_all()
            raise
        with self._state:
            self._spare.append(self._buffers.pop(chunk))
            self._done.add(chunk)
            while self._earliest in self._done:
                self._done.discard(self._earliest)
                self._earliest += 1
            self.written += size
            written = self.written
            self._state.notify_all()
        if self._on_written is not None:
            self._on_written(written)

    def fail(self, error: BaseException) -> None:
        """Stop: waiting callers raise `error`."""
        with self._state:
            self._error = self._error or error
            self._state.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """Wait for every chunk's write, then sync and close every file."""
        self._disk.shutdown(wait=True)
        for pending in self._pending:
            pending.result()
        with self._state:
            self._raise()
            if self._earliest != self._first[-1]:
                raise RuntimeError(f"{self._first[-1] - self._earliest} output chunks unfilled")
        # synced only now: an fsync while direct writes go on stalls them (on ext4 they wait for
        # the journal commit it forces), and the written blocks leave it little else to do
        for found in self.files:
            found.finish()

    def abandon(self) -> None:
        """After a failure: wait for writes under way, close the files (the caller removes
        them)."""
        self.fail(RuntimeError("abandoned"))
        self._disk.shutdown(wait=True)
        for found in self.files:
            found.close()
