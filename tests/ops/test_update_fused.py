"""Adding the update with one fused matrix product saves a pass over every merged element; it
must give the bits of the separate form (product, then add: PEFT's order) and be declined where
it would not (on this machine's kernels, or by the arithmetic)."""

from __future__ import annotations

import pytest
import torch

from loramerge.adapter import ModuleKind
from loramerge.ops.update import add_update_in_place, update_rows


def _factors(rows: int, columns: int, rank: int, magnitude: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    lora_b = torch.randn(rows, rank, generator=generator) * magnitude
    lora_a = torch.randn(rank, columns, generator=generator) * magnitude
    # base values of the product's size and either sign, so that sums cancel and round often
    base = torch.randn(rows, columns, generator=generator) * magnitude * magnitude * rank
    return lora_b, lora_a, base.to(torch.bfloat16).float()


@pytest.mark.oracle
@pytest.mark.parametrize("rank", [1, 2, 16, 64, 256])
@pytest.mark.parametrize("magnitude", [1e-3, 0.05, 2.0])
@pytest.mark.parametrize(("rows", "columns"), [(512, 2048), (96, 5632), (7, 33), (1, 64)])
def test_the_fused_add_keeps_the_bits_of_product_then_add(rank, magnitude, rows, columns):
    """Rank 1 and single rows are where this machine's kernels fuse differently: the probe
    must catch those and fall back, whatever the kernels, so the bits are compared always."""
    lora_b, lora_a, base = _factors(rows, columns, rank, magnitude, seed=rank + rows)
    for start, stop in [(0, rows), (rows // 3, rows)]:
        separate = base[start:stop] + update_rows(
            lora_b, lora_a, 1.0, ModuleKind.LINEAR, start, stop
        )
        tile = base[start:stop].clone()
        if not add_update_in_place(tile, lora_b, lora_a, 1.0, ModuleKind.LINEAR, start, stop):
            assert torch.equal(tile, base[start:stop]), "declined, so untouched"
            tile += update_rows(lora_b, lora_a, 1.0, ModuleKind.LINEAR, start, stop)
        assert torch.equal(tile.view(torch.int32), separate.view(torch.int32))


def test_the_common_tile_shapes_are_fused_here():
    """Where the speed comes from: rank 16 on a tile of a Llama projection (a platform whose
    kernels round differently would be correct but slower, and fail here)."""
    lora_b, lora_a, base = _factors(1024, 2048, 16, 0.05, seed=0)
    assert add_update_in_place(base, lora_b, lora_a, 1.0, ModuleKind.LINEAR, 0, 1024)


@pytest.mark.oracle
def test_fused_add_handles_conv2d_rows():
    lora_b, lora_a, _ = _factors(96, 16 * 3 * 3, 8, 0.1, seed=5)
    base = torch.randn(96, 16, 3, 3)
    separate = base[8:96] + update_rows(
        lora_b, lora_a, 1.0, ModuleKind.CONV, 8, 96, row_shape=(16, 3, 3)
    )
    fused = base[8:96].clone()
    assert add_update_in_place(fused, lora_b, lora_a, 1.0, ModuleKind.CONV, 8, 96)
    assert torch.equal(fused, separate)


@pytest.mark.parametrize(
    ("scale", "kind"),
    [
        (0.5, ModuleKind.LINEAR),  # the product would be rounded twice, then added
        (3.0, ModuleKind.LINEAR),
        (1.0, ModuleKind.CONV1D),  # transposed layouts sum in another order
        (1.0, ModuleKind.EMBEDDING),
    ],
)
def test_fusing_is_declined_where_the_arithmetic_differs(scale, kind):
    lora_b, lora_a, base = _factors(16, 16, 8, 0.1, seed=3)
    tile = base.clone()
    assert not add_update_in_place(tile, lora_b, lora_a, scale, kind, 0, 16)
    assert torch.equal(tile, base)
