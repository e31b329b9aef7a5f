"""The tile buffer pool hands the same memory out again, never two live tiles the same bytes."""

from __future__ import annotations

import torch

from loramerge.buffers import BufferPool
from loramerge.direct_io import BLOCK


def test_returned_buffers_are_reused_and_live_ones_never_shared():
    pool = BufferPool()
    first = pool.take(3 << 20)
    second = pool.take_like((1024, 512), torch.float32)
    assert first.data_ptr() % BLOCK == 0 and second.data_ptr() % BLOCK == 0
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    address = first.data_ptr()
    pool.give(first[10:20])  # any view returns its buffer
    again = pool.take(2 << 20)
    assert again.data_ptr() == address and again.numel() == 2 << 20
    third = pool.take(3 << 20)
    assert third.untyped_storage().data_ptr() not in {
        again.untyped_storage().data_ptr(),
        second.untyped_storage().data_ptr(),
    }


def test_best_fit_among_many_free_buffers_of_different_sizes():
    pool = BufferPool()
    taken = [pool.take(size << 20) for size in (5, 1, 3, 2, 4)]
    for tensor in taken:
        pool.give(tensor)
    fit = pool.take((2 << 20) + 1)
    assert fit.untyped_storage().nbytes() >= 3 << 20
    assert fit.data_ptr() == taken[2].data_ptr(), "the smallest buffer that fits"
    pool.give(torch.empty(10))  # not from the pool: ignored
    pool.give(fit)
    pool.give(fit)  # twice: the second is ignored
    assert pool.take(2 << 20).data_ptr() != pool.take(2 << 20).data_ptr()
