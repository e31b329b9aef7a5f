"""Every tile of the update has the bits of the same rows of the whole product, which is what
PEFT forms. Balanced tiling keeps merge tiles wide, but `update_rows` must not depend on that:
whatever range it is asked for, even one row or column, the kernel must see a product at least
as wide as the whole one's kernels do."""

from __future__ import annotations

import pytest
import torch

from loramerge.ops.spans import MIN_PRODUCT_SPAN, product_span
from loramerge.ops.update import add_update_in_place, update_rows


def _factors(outputs: int, inputs: int, rank: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    lora_b = torch.randn(outputs, rank, generator=generator) * 0.05
    lora_a = torch.randn(rank, inputs, generator=generator) * 0.05
    return lora_b, lora_a


def _tilings(size: int):
    """Tiles of every width from 1 to 20 across the whole range, plus a one-row tail."""
    for width in range(1, 21):
        yield from ((start, min(start + width, size)) for start in range(0, size, width))
    yield size - 1, size


@pytest.mark.oracle
@pytest.mark.parametrize("rank", [1, 2, 16])
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.3])
def test_row_tiles_are_slices_of_the_whole_product(rank, scale):
    lora_b, lora_a = _factors(90, 70, rank, seed=rank)
    whole = (lora_b @ lora_a) * scale
    for start, stop in _tilings(90):
        tile = update_rows(lora_b, lora_a, scale, False, start, stop)
        assert torch.equal(tile.view(torch.int32), whole[start:stop].view(torch.int32)), (
            start,
            stop,
        )


@pytest.mark.oracle
@pytest.mark.parametrize("rank", [1, 2, 16])
def test_transposed_tiles_are_slices_of_the_whole_product(rank):
    """Embeddings and GPT-2's Conv1D are stored (in x out): a tile of stored rows is a range of
    the product's columns, and narrow column ranges take another kernel here."""
    lora_b, lora_a = _factors(40, 100, rank, seed=rank + 1)
    whole = ((lora_b @ lora_a) * 0.5).T
    for start, stop in _tilings(100):
        tile = update_rows(lora_b, lora_a, 0.5, True, start, stop)
        assert torch.equal(tile.contiguous().view(torch.int32), whole[start:stop].view(torch.int32))


@pytest.mark.oracle
def test_the_fused_add_of_a_tail_matches_the_whole_product():
    lora_b, lora_a = _factors(1027, 256, 16, seed=3)
    base = torch.randn(1027, 256)
    expected = base + lora_b @ lora_a
    for start, stop in [(0, 1024), (1024, 1027), (1000, 1027)]:
        tile = base[start:stop].clone()
        if not add_update_in_place(tile, lora_b, lora_a, 1.0, False, start, stop):
            tile += update_rows(lora_b, lora_a, 1.0, False, start, stop)
        assert torch.equal(tile.view(torch.int32), expected[start:stop].view(torch.int32))


@pytest.mark.parametrize(
    ("start", "stop", "size", "expected"),
    [
        (0, 1024, 4096, (0, 1024)),  # wide enough: itself
        (4095, 4096, 4096, (4096 - MIN_PRODUCT_SPAN, 4096)),  # a one-row tail: widened back
        (0, 3, 4096, (0, MIN_PRODUCT_SPAN)),
        (100, 103, 4096, (100, 100 + MIN_PRODUCT_SPAN)),
        (5, 7, 10, (0, 10)),  # smaller than the span: the whole product
    ],
)
def test_product_span(start, stop, size, expected):
    assert product_span(start, stop, size) == expected
