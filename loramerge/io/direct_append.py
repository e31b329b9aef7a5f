"""Appending to a file opened with O_DIRECT: bytes are gathered in block-aligned staging buffers
and written in whole blocks by a background thread, while the caller fills the other buffer."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from loramerge.io.direct_io import BLOCK, aligned_empty, as_memoryview, set_direct, write_all

if TYPE_CHECKING:
    import torch


class BlockAppender:
    """Appends bytes at the end of what it has written so far (from offset 0).

    Staging buffers of `capacity` bytes take turns: up to `in_flight` of them are being written
    to the disk (a disk serves two outstanding writes faster than one) while the next fills.
    Callers either copy bytes in (`append`, `append_tensor`) or produce them in place
    (`reserve`, then `commit`), which saves a pass over the data. The last partial block is
    written through the page cache by `finish`.
    """

    def __init__(self, fd: int, capacity: int = 16 << 20, in_flight: int = 2) -> None:
        if capacity % BLOCK or capacity < BLOCK:
            raise ValueError(f"capacity must be a positive multiple of {BLOCK}")
        self._fd = fd
        self._buffers = [aligned_empty(capacity) for _ in range(in_flight + 1)]
        self._pending: list[Future | None] = [None] * len(self._buffers)
        self._current = 0
        self._fill = 0
        self._position = 0  # file offset of the current buffer's first byte, block-aligned
        self._disk = ThreadPoolExecutor(in_flight, thread_name_prefix="loramerge-write")

    @property
    def _staging(self) -> torch.Tensor:
        return self._buffers[self._current]

    def reserve(self, nbytes: int, alignment: int = 1) -> torch.Tensor | None:
        """The next `nbytes` of staging as a uint8 tensor to fill, starting at a multiple of
        `alignment` within the (aligned) buffer; None when they do not fit in one buffer (or the
        file position is not aligned): copy them in with `append_tensor` instead."""
        if self._fill % alignment:
            return None
        if self._fill + nbytes > self._staging.numel():
            self._hand_over()
            if self._fill + nbytes > self._staging.numel():
                return None
        return self._staging[self._fill : self._fill + nbytes]

    def commit(self, nbytes: int) -> None:
        """The reserved bytes are filled: they belong to the file now."""
        self._fill += nbytes
        if self._fill == self._staging.numel():
            self._hand_over()

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Small byte strings (headers); tensors go through `append_tensor` without a copy."""
        if memoryview(data).nbytes:
            import torch

            self.append_tensor(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def append_tensor(self, tensor: torch.Tensor) -> None:
        """The tensor's bytes, copied by torch (which releases the GIL while copying)."""
        import torch

        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        done = 0
        while done < flat.numel():
            take = min(self._staging.numel() - self._fill, flat.numel() - done)
            self._staging[self._fill : self._fill + take].copy_(flat[done : done + take])
            done += take
            self.commit(take)

    def _hand_over(self) -> None:
        """Send the current buffer's whole blocks to the disk; continue in the next buffer,
        starting with the partial block that was left over."""
        whole = self._fill - self._fill % BLOCK
        if not whole:
            return
        full, position = self._staging, self._position
        self._pending[self._current] = self._disk.submit(
            write_all, self._fd, as_memoryview(full)[:whole], position
        )
        self._current = (self._current + 1) % len(self._buffers)
        self._wait(self._current)  # the buffer about to be filled must be on disk already
        tail = self._fill - whole
        self._staging[:tail].copy_(full[whole : self._fill])
        self._position += whole
        self._fill = tail

    def _wait(self, index: int) -> None:
        pending, self._pending[index] = self._pending[index], None
        if pending is not None:
            pending.result()  # re-raises a failed write (a full disk) in the caller

    def finish(self) -> None:
        """Write everything still staged and wait until it is written."""
        try:
            self._hand_over()
            for index in range(len(self._buffers)):
                self._wait(index)
            if self._fill:
                set_direct(self._fd, False)
                write_all(self._fd, as_memoryview(self._staging)[: self._fill], self._position)
                self._position += self._fill
                self._fill = 0
        finally:
            self.close()

    def close(self) -> None:
        """Stop the background writer (after a failure: pending writes are waited for, their
        errors dropped, since the caller is already reporting one) and free the buffers."""
        self._disk.shutdown(wait=True)
        self._buffers.clear()
