"""Moving a power-of-two LoRA scale into A saves a pass over every merged element; it must give
PEFT's (B @ A) * s bit for bit, and must be declined wherever that cannot be guaranteed."""

from __future__ import annotations

import pytest
import torch

from loramerge.adapter import ModuleKind
from loramerge.ops.update import prescaled_factors, update_rows


def _peft_order(lora_b: torch.Tensor, lora_a: torch.Tensor, scale: float) -> torch.Tensor:
    return (lora_b @ lora_a) * scale


@pytest.mark.oracle
@pytest.mark.parametrize("scale", [2.0, 4.0, 64.0])
@pytest.mark.parametrize("magnitude", [1e-4, 0.02, 3.0])
@pytest.mark.parametrize("rank", [1, 16, 64])
def test_power_of_two_scale_moved_into_a_keeps_every_bit(scale, magnitude, rank):
    generator = torch.Generator().manual_seed(rank)
    lora_b = torch.randn(96, rank, generator=generator) * magnitude
    lora_a = torch.randn(rank, 80, generator=generator) * magnitude
    lora_b[3, 0] = 0.0  # zeros are fine
    b, a, rest = prescaled_factors(lora_b, lora_a, scale)
    assert rest == 1.0 and torch.equal(a, lora_a * scale), "the scale was moved"
    expected = _peft_order(lora_b, lora_a, scale)
    for start, stop in [(0, 96), (0, 8), (40, 96)]:
        rows = update_rows(b, a, rest, ModuleKind.LINEAR, start, stop)
        assert torch.equal(rows, expected[start:stop])
    columns = update_rows(b.T.contiguous().T, a, rest, ModuleKind.CONV1D, 0, 80)
    assert torch.equal(columns, expected.T)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25, 3.0, 1.7320508])
def test_other_scales_are_left_to_the_multiplication(scale):
    lora_b, lora_a = torch.randn(8, 4), torch.randn(4, 8)
    b, a, rest = prescaled_factors(lora_b, lora_a, scale)
    assert rest == scale and a is lora_a and b is lora_b


def test_factors_so_small_that_products_round_below_normal_are_declined():
    # products near 2^-150: rounding there is absolute, so scaling first changes the result
    tiny = 2.0**-75 * 1.0000001
    lora_b = torch.full((4, 2), tiny)
    lora_a = torch.full((2, 4), tiny)
    naive = lora_b @ (lora_a * 2.0)
    assert not torch.equal(naive, _peft_order(lora_b, lora_a, 2.0)), "the guard matters here"
    assert prescaled_factors(lora_b, lora_a, 2.0)[2] == 2.0


def test_subnormal_entries_and_overflow_risks_are_declined():
    lora_b, lora_a = torch.randn(4, 2), torch.randn(2, 4)
    lora_a[0, 0] = 1e-40  # subnormal
    assert prescaled_factors(lora_b, lora_a, 2.0)[2] == 2.0
    huge = torch.full((4, 2), 2.0**63)
    assert prescaled_factors(huge, huge.T.contiguous(), 2.0)[2] == 2.0
    assert prescaled_factors(torch.zeros(4, 2), lora_a, 2.0)[2] == 2.0
