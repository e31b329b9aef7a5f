"""Reusable tile buffers for the streaming merge.

Every tile of a merge needs a few megabytes (the base rows as read, their float32 copy, the
update). Fresh allocations of that size come from new pages the kernel must zero on first
touch, which cost as much system time as the arithmetic; a pool hands the same pages out again.
"""

from __future__ import annotations

import math
import threading

import torch

from loramerge.io.direct_io import BLOCK, aligned_empty


class BufferPool:
    """Block-aligned uint8 buffers in a few fixed sizes, handed out by `take` and returned by
    `give` (from any thread, with any view of the buffer).

    Fixed sizes (say, one for tiles as stored and one for their float32 copies) mean any
    returned buffer fits the next request of its class, so after the first few tiles nothing is
    allocated any more and memory stays at what the pipeline holds at once. A request is served
    from the smallest class it fits; larger ones get buffers of their own, which are not
    pooled. The pool holds every lent buffer until it is returned (so that its address cannot
    be reused by another tensor meanwhile): whoever takes tiles in a loop must give them back.
    A pool lives for one run.
    """

    def __init__(self, *sizes: int) -> None:
        self.sizes = sorted({-(-max(size, 1) // BLOCK) * BLOCK for size in sizes})
        self._free: dict[int, list[torch.Tensor]] = {size: [] for size in self.sizes}
        self._lent: dict[int, tuple[int, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """An uninitialised, BLOCK-aligned uint8 tensor of exactly nbytes."""
        size = next((size for size in self.sizes if nbytes <= size), None)
        if size is None:
            return aligned_empty(nbytes)
        with self._lock:
            free = self._free[size]
            buffer = free.pop() if free else None
        if buffer is None:
            buffer = aligned_empty(size)
        with self._lock:
            self._lent[_key(buffer)] = (size, buffer)
        return buffer[:nbytes]

    def take_like(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` in a pooled buffer."""
        return self.take(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)

    @property
    def lent(self) -> int:
        """Buffers handed out and not yet returned."""
        with self._lock:
            return len(self._lent)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the buffers this pool has made (lent or free)."""
        with self._lock:
            free = sum(size * len(buffers) for size, buffers in self._free.items())
            return free + sum(size for size, _ in self._lent.values())

    def give(self, tensor: torch.Tensor) -> None:
        """Return the buffer `tensor` lives in; the caller must not use the tensor (or any
        other view of that buffer) afterwards. Tensors not from this pool are ignored."""
        with self._lock:
            found = self._lent.pop(_key(tensor), None)
            if found is not None:
                size, buffer = found
                self._free[size].append(buffer)


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()
