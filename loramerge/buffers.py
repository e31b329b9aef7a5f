"""Reusable tile buffers for the streaming merge.

Every tile of a merge needs a few megabytes (the base rows as read, their float32 copy, the
update). Fresh allocations of that size come from new pages the kernel must zero on first
touch, which cost as much system time as the arithmetic; a pool hands the same pages out again.
"""

from __future__ import annotations

import threading

import torch

from loramerge.direct_io import BLOCK, aligned_empty

_GRANULE = 1 << 20  # sizes are rounded up to this, so that similar tiles share buffers
_KEEP = 12  # free buffers kept at most; more are left to the garbage collector


class BufferPool:
    """Block-aligned uint8 buffers, handed out by `take` and returned by `give` (from any
    thread, with any view of the buffer). Buffers that are never returned are simply freed."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """An uninitialised, BLOCK-aligned uint8 tensor of exactly nbytes."""
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fitting:
                # list.remove would compare tensors elementwise: pop by position
                buffer = self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
            else:
                buffer = aligned_empty(max(BLOCK, -(-nbytes // _GRANULE) * _GRANULE))
            self._lent[_key(buffer)] = buffer
        return buffer[:nbytes]

    def take_like(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` in a pooled buffer."""
        count = 1
        for size in shape:
            count *= size
        return self.take(count * dtype.itemsize).view(dtype).view(shape)

    def give(self, tensor: torch.Tensor) -> None:
        """Return the buffer `tensor` lives in; the caller must not use the tensor (or any
        other view of that buffer) afterwards. Tensors not from this pool are ignored."""
        with self._lock:
            buffer = self._lent.pop(_key(tensor), None)
            if buffer is None:
                return
            self._free.append(buffer)
            if len(self._free) > _KEEP:
                smallest = min(range(len(self._free)), key=lambda i: self._free[i].numel())
                self._free.pop(smallest)


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()
