"""The streaming safetensors writer: header first, then each tensor's bytes, copied or computed."""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loramerge.errors import FormatError
from loramerge.io.direct_append import BlockAppender
from loramerge.io.direct_io import try_set_direct
from loramerge.io.safetensors_header import dtype_code, itemsize

if TYPE_CHECKING:  # torch loads with the first tensor written: headers are laid out without it
    import torch

_COPY_CHUNK = 16 << 20


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of a CPU tensor in row-major order (no copy when contiguous)."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


@dataclass(frozen=True)
class OutputTensor:
    """What a writer needs up front to lay out one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def encode_header(tensors: Iterable[OutputTensor], metadata: dict[str, str]) -> bytes:
    """Header bytes (length prefix included), padded with spaces to a multiple of 8 like the
    official writer; tensors are laid out in the order given."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    position = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [position, position + tensor.nbytes],
        }
        position += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


_WRITEBACK_STEP = 64 << 20


def _libc_sync_file_range():
    """Linux's sync_file_range, or None: starts writeback without waiting for it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class StreamingWriter:
    """Writes a safetensors file header-first, then each tensor's bytes in order.

    The caller feeds bytes with `write`, `write_tensor` or `copy_range`; `close` checks that every
    tensor got exactly its size, then flushes and fsyncs. With `direct`, the file is written with
    O_DIRECT through aligned staging buffers (see direct_append); `copy_range` is then refused,
    since a kernel-side copy would go through the page cache the direct writes bypass.
    """

    def __init__(
        self,
        path: Path,
        tensors: list[OutputTensor],
        metadata: dict[str, str],
        *,
        direct: bool = False,
    ) -> None:
        self.path = path
        self._expected = sum(t.nbytes for t in tensors)
        self._written = 0
        self._unflushed = 0
        self._appender: BlockAppender | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o644)
        if direct and try_set_direct(fd):
            self._appender = BlockAppender(fd)
            self._file = os.fdopen(fd, "wb", buffering=0)
        else:
            self._file = os.fdopen(fd, "wb")
        self._emit(encode_header(tensors, metadata))

    @property
    def direct(self) -> bool:
        return self._appender is not None

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            # already failing (often a full disk): the caller deletes the unfinished file
            self.abandon()

    @property
    def bytes_written(self) -> int:
        return self._written

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        if self._appender is not None:
            self._appender.append(data)
        else:
            self._file.write(data)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        count = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._check_room(count)
        self._emit(data)
        self._written += count
        self._start_writeback()
        return count

    def write_tensor(self, tensor: torch.Tensor) -> int:
        if self._appender is None:
            return self.write(tensor_bytes(tensor))
        count = tensor.numel() * tensor.element_size()
        self._check_room(count)
        self._appender.append_tensor(tensor)
        self._written += count
        return count

    def write_rounded(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Write `values` converted to `dtype` (rounded once, row-major); returns the flat
        converted tensor as written, which is only valid until the next write."""
        count = values.numel() * dtype.itemsize
        self._check_room(count)
        target = self._appender.reserve(count, dtype.itemsize) if self._appender else None
        if target is None:
            rounded = values.to(dtype).reshape(-1)
            self.write_tensor(rounded)
            return rounded
        # converted straight into the staging buffer: no separate rounded copy to move
        converted = target.view(dtype)
        converted.view(values.shape).copy_(values)
        assert self._appender is not None
        self._appender.commit(count)
        self._written += count
        return converted

    def copy_range(self, source_fd: int, offset: int, length: int) -> int:
        """Copy bytes from another file unchanged, kernel-side where the OS allows it."""
        if self._appender is not None:
            raise RuntimeError("copy_range on a direct writer: write the bytes instead")
        self._check_room(length)
        self._file.flush()
        out_fd = self._file.fileno()
        done = 0
        copy_file_range = getattr(os, "copy_file_range", None)
        while done < length:
            step = min(_COPY_CHUNK, length - done)
            moved = 0
            if copy_file_range is not None:
                try:
                    moved = copy_file_range(source_fd, out_fd, step, offset + done)
                except OSError:
                    copy_file_range = None
            if moved == 0:
                chunk = os.pread(source_fd, step, offset + done)
                if not chunk:
                    raise FormatError("source ended early during a copy", file=self.path)
                os.write(out_fd, chunk)
                moved = len(chunk)
            done += moved
        # copy_file_range and os.write move the fd position; keep the buffered file in step
        self._file.seek(0, os.SEEK_END)
        self._written += length
        self._start_writeback()
        return length

    def _start_writeback(self) -> None:
        """Hand finished bytes to the disk as they accumulate, so that the fsync at close only
        waits for the tail instead of the whole file (and dirty pages do not pile up)."""
        if self._appender is not None or _SYNC_FILE_RANGE is None:
            return
        if self._written - self._unflushed < _WRITEBACK_STEP:
            return
        self._file.flush()
        # offset 0, length 0: every dirty page of the file; pages already under way are skipped
        _SYNC_FILE_RANGE(self._file.fileno(), 0, 0, _SYNC_FILE_RANGE_WRITE)
        self._unflushed = self._written

    def _check_room(self, count: int) -> None:
        if self._written + count > self._expected:
            raise RuntimeError(
                f"writer for {self.path} got {self._written + count} bytes, the header has room "
                f"for "
                f"{self._expected}"
            )

    def abandon(self) -> None:
        """Close without the completeness check (after a failure elsewhere); no-op once closed."""
        if self._appender is not None:
            self._appender.close()
        if not self._file.closed:
            # flushing after a full disk fails again; the first error is the one to report
            with contextlib.suppress(OSError):
                self._file.close()

    def close(self) -> None:
        if self._file.closed:
            return
        if self._written != self._expected:
            self.abandon()
            raise RuntimeError(
                f"writer for {self.path} got {self._written} bytes, "
                f"the header promised {self._expected}"
            )
        if self._appender is not None:
            self._appender.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write small in-memory tensors (adapters) with the streaming writer, keys sorted."""
    names = sorted(tensors)
    layout = [OutputTensor(n, dtype_code(tensors[n].dtype), tuple(tensors[n].shape)) for n in names]
    with StreamingWriter(path, layout, metadata) as writer:
        for name in names:
            writer.write_tensor(tensors[name])
