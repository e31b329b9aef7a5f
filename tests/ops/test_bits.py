"""The torch-free engine's integer arithmetic against torch's own conversions (the oracle): every
float32 bit pattern class a conversion treats apart, and random ones."""

from __future__ import annotations

import numpy
import pytest
import torch

from loramerge.model import fast_checks
from loramerge.ops import bits


def _all_kinds(count: int = 200_000) -> numpy.ndarray:
    generator = numpy.random.default_rng(11)
    found = generator.integers(0, 2**32, size=count, dtype=numpy.uint64).astype(numpy.uint32)
    # every low-16-bit pattern around the rounding point, on odd and even kept values
    lows = numpy.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], numpy.uint32)
    highs = numpy.array(
        [0x3F80, 0x3F81, 0x7F7F, 0x7F80, 0x7FC0, 0xFF7F, 0x0000, 0x8001], numpy.uint32
    )
    edges = (highs[:, None] << 16 | lows[None, :]).reshape(-1)
    return numpy.concatenate([edges, fast_checks.special_values().view(numpy.uint32), found]).view(
        numpy.float32
    )


@pytest.mark.oracle
def test_rounding_to_bfloat16_is_torch_s():
    values = _all_kinds()
    rounded = numpy.empty(values.size, numpy.uint16)
    bits.round_into(values, "BF16", rounded, numpy.empty(values.size, numpy.uint32))
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    assert numpy.array_equal(rounded, expected.view(numpy.uint16))


@pytest.mark.oracle
def test_widening_bfloat16_is_torch_s():
    stored = numpy.arange(2**16, dtype=numpy.uint32).astype(numpy.uint16)
    widened = bits.widen_into(stored, "BF16", numpy.empty(stored.size, numpy.float32))
    expected = torch.from_numpy(stored.view(numpy.int16).copy()).view(torch.bfloat16).float()
    assert numpy.array_equal(widened.view(numpy.uint32), expected.numpy().view(numpy.uint32))


@pytest.mark.oracle
def test_the_machine_check_agrees_with_torch_here():
    """The once-per-machine check that lets the torch-free engine run: on this machine torch's
    products and conversions are what the engine computes."""
    assert fast_checks.products_match()
    assert fast_checks.conversions_match()


def test_nonfinite_and_changed_counts():
    values = numpy.array([1.0, numpy.nan, numpy.inf, -numpy.inf, 0.0], numpy.float32)
    rounded = numpy.empty(values.size, numpy.uint16)
    bits.round_into(values, "BF16", rounded, numpy.empty(values.size, numpy.uint32))
    assert bits.nonfinite_count(rounded.view(numpy.uint8), "BF16") == 3
    assert bits.nonfinite_count(values.view(numpy.uint8), "F32") == 3
    before = rounded.copy()
    before[0] ^= 1
    assert bits.count_changed(rounded, before) == 1
