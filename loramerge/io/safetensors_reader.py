"""Reading safetensors tensors: positioned reads (direct I/O where it pays) on the descriptor
whose header was validated."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy

from loramerge.errors import FormatError
from loramerge.io.direct_io import Allocate, DirectRangeReader, aligned_empty, as_memoryview
from loramerge.io.safetensors_header import (
    TensorEntry,
    data_error,
    header_from_fd,
    itemsize,
    open_readonly,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch


class SafetensorsReader:
    """An open safetensors file read with positioned reads: no mmap, no whole-file loads.

    The header is validated on the same descriptor the tensors are read from, so every read
    lies inside the byte ranges that were checked against the file's size.
    """

    def __init__(
        self, path: str | Path, *, direct: bool = False, allocate: Allocate | None = None
    ) -> None:
        self.path = Path(path)
        self._direct: DirectRangeReader | None = None
        self._allocate = allocate
        self._fd = open_readonly(self.path)
        try:
            self.header = header_from_fd(self._fd, self.path)
        except BaseException as exc:
            os.close(self._fd)
            self._fd = -1
            if isinstance(exc, OSError):
                raise FormatError(
                    f"cannot be read ({exc.strerror or exc})", file=self.path
                ) from None
            raise
        if direct:
            # reads large ranges from the disk straight into memory when the file is not cached
            self._direct = DirectRangeReader(self._fd, allocate or aligned_empty)

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def fd(self) -> int:
        return self._fd

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.header.entries[name]
        except KeyError:
            raise FormatError(f"has no tensor {name!r}", file=self.path) from None

    def absolute_offset(self, entry: TensorEntry) -> int:
        return self.header.data_start + entry.begin

    def read_bytes(self, offset: int, length: int) -> Any:
        """`length` bytes at `offset` as a uint8 tensor (allocated without zero-filling), or
        a numpy array where the reader's allocator makes arrays."""
        if self._direct is not None:
            found = self._direct.read(offset, length)
            if found is not None:
                return found
        if self._allocate is not None:
            buffer = self._allocate(length)
        else:
            import torch

            buffer = torch.empty(length, dtype=torch.uint8)
        self._fill(as_memoryview(buffer), offset)
        return buffer

    def read_array(self, name: str) -> numpy.ndarray:
        """A whole tensor's stored bytes as a uint8 numpy array (no torch needed)."""
        entry = self.entry(name)
        buffer = numpy.empty(entry.nbytes, dtype=numpy.uint8)
        self._fill(as_memoryview(buffer), self.absolute_offset(entry))
        return buffer

    def _fill(self, view: memoryview, offset: int) -> None:
        done, length = 0, view.nbytes
        while done < length:
            if hasattr(os, "preadv"):
                chunk = os.preadv(self._fd, [view[done:]], offset + done)
            else:  # platforms without preadv: one extra copy per read
                data = os.pread(self._fd, length - done, offset + done)
                view[done : done + len(data)] = data
                chunk = len(data)
            if chunk == 0:
                raise data_error(self.path, "file ended early while reading tensor data")
            done += chunk

    def read(
        self, name: str, rows: tuple[int, int] | None = None, row_elements: int | None = None
    ) -> torch.Tensor:
        """A tensor, or the slice rows[0]:rows[1] along its first axis, as a fresh CPU tensor.
        With `row_elements`, the tensor is read as rows of that many elements (its leading
        dimensions flattened), e.g. the rows of a stack of matrices one after the other."""
        entry = self.entry(name)
        shape = list(entry.shape)
        offset, length = self.absolute_offset(entry), entry.nbytes
        row_bytes = entry.row_bytes
        if row_elements is not None and shape:
            count = math.prod(shape)
            if row_elements < 1 or count % row_elements:
                raise IndexError(f"{name!r} of shape {entry.shape} has no rows of {row_elements}")
            shape = [count // row_elements, row_elements]
            row_bytes = row_elements * itemsize(entry.dtype)
        if rows is not None and shape:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise IndexError(f"rows {rows} outside tensor {name!r} of shape {entry.shape}")
            offset += start * row_bytes
            length = (stop - start) * row_bytes
            shape[0] = stop - start
        return bytes_to_tensor(self.read_bytes(offset, length), entry.dtype, tuple(shape))


def bytes_to_tensor(buffer: torch.Tensor, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Reinterpret raw little-endian bytes (a uint8 tensor) as a tensor of `code` and `shape`."""
    import torch

    dtype = torch_dtype(code)
    if buffer.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    if buffer.storage_offset() % dtype.itemsize:
        buffer = buffer.clone()  # a view of an unaligned tensor inside a larger read
    return buffer.view(dtype).reshape(shape)
