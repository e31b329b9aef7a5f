"""The tile buffer pool hands the same memory out again, never two live tiles the same bytes."""

from __future__ import annotations

import pytest
import torch
from helpers import ADAPTERS, BASES, MERGE_CASES

from loramerge.io.buffers import BufferPool
from loramerge.io.direct_io import BLOCK


def test_returned_buffers_are_reused_and_live_ones_never_shared():
    pool = BufferPool(3 << 20)
    first = pool.take(3 << 20)
    second = pool.take_like((512, 512), torch.float32)
    assert first.data_ptr() % BLOCK == 0 and second.data_ptr() % BLOCK == 0
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    address = first.data_ptr()
    pool.give(first[10:20])  # any view returns its buffer
    again = pool.take(2 << 20)
    assert again.data_ptr() == address and again.numel() == 2 << 20
    third = pool.take(1)
    assert third.untyped_storage().data_ptr() not in {
        again.untyped_storage().data_ptr(),
        second.untyped_storage().data_ptr(),
    }
    assert pool.lent == 3 and pool.allocated_bytes == 3 * (3 << 20)


def test_requests_larger_than_the_pool_size_get_their_own_buffer():
    pool = BufferPool(1 << 20)
    large = pool.take(3 << 20)
    assert large.numel() == 3 << 20 and large.data_ptr() % BLOCK == 0
    assert pool.lent == 0 and pool.allocated_bytes == 0
    pool.give(large)  # not from the pool: ignored
    pool.give(torch.empty(10))
    small = pool.take(100)
    pool.give(small)
    pool.give(small)  # twice: the second is ignored
    assert pool.allocated_bytes == 1 << 20
    assert pool.take(1 << 20).data_ptr() != pool.take(1 << 20).data_ptr()


def test_each_request_is_served_from_the_smallest_class_it_fits():
    pool = BufferPool(4 << 20, 1 << 20)
    assert pool.sizes == [1 << 20, 4 << 20]
    small, large = pool.take(100), pool.take((1 << 20) + 1)
    assert pool.allocated_bytes == 5 << 20
    pool.give(small)
    pool.give(large)
    assert pool.take(1 << 20).data_ptr() == small.data_ptr()
    assert pool.take(2 << 20).data_ptr() == large.data_ptr()
    assert pool.allocated_bytes == 5 << 20


@pytest.mark.parametrize(
    ("adapter_name", "base_name"), MERGE_CASES, ids=[a for a, _ in MERGE_CASES]
)
@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "sequential"])
def test_merging_and_inspecting_give_every_tile_back(
    tmp_path, monkeypatch, adapter_name, base_name, pipelined
):
    """A tile that is never given back stays in the pool until the run ends: a leak that
    grows with the model (DoRA, biases and inspect each have their own paths)."""
    from loramerge.formats.registry import read_adapter
    from loramerge.jobs.inspect import inspect_adapter
    from loramerge.model import sources, tiling
    from loramerge.model.folder import open_base
    from loramerge.model.planner import plan_merge
    from loramerge.model.stream import stream_plan

    pools: list[BufferPool] = []

    class RecordedPool(BufferPool):
        def __init__(self, *sizes: int) -> None:
            super().__init__(*sizes)
            pools.append(self)

    monkeypatch.setattr(sources, "BufferPool", RecordedPool)
    monkeypatch.setattr(tiling, "TILE_BYTES", 4 * 64 * 3)  # many tiles per tensor
    monkeypatch.setattr(tiling, "MIN_TILE_ROWS", 1)
    adapter = read_adapter(ADAPTERS / adapter_name)
    base = open_base(BASES / base_name)
    plan = plan_merge(base, adapter)
    stream_plan(plan, base, tmp_path, pipelined=pipelined)
    inspect_adapter(adapter, BASES / base_name)
    assert len(pools) == 2
    assert [pool.lent for pool in pools] == [0, 0]
    # memory is what the pipeline holds at once, not what it streamed
    tile_count = sum(len(tiling.tiles(t.shape)) for s in plan.shards for t in s.tensors)
    largest = max(pool.allocated_bytes // max(pool.sizes) for pool in pools)
    assert largest <= 24 < tile_count


def test_checking_and_merging_do_not_keep_the_adapter_in_memory(tmp_path):
    """Factors are read when their module is merged and then dropped, so a merge's memory does
    not grow with the adapter (which grows with the model)."""
    from loramerge.adapter_checks import check_adapter
    from loramerge.formats.registry import read_adapter
    from loramerge.model.folder import open_base
    from loramerge.model.planner import plan_merge
    from loramerge.model.stream import stream_plan

    adapter = read_adapter(ADAPTERS / "llama-lora")
    check_adapter(adapter)
    base = open_base(BASES / "llama")
    stream_plan(plan_merge(base, adapter), base, tmp_path)
    factors = [t for m in adapter.modules.values() for t in (m.lora_A, m.lora_B)]
    assert factors and all(t._value is None for t in factors)
    assert factors[0].load().shape == factors[0].shape  # read again on demand
