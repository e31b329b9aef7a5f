"""A LoRA update added to float32 rows with numpy and torch's own BLAS (no torch): the same
operations, in the same order, as loramerge.ops.update does with torch (see that module for why
each step keeps PEFT's bits); loramerge.model.fast_checks confirms they give the same bits."""

from __future__ import annotations

import functools
import math

import numpy

from loramerge.ops.spans import product_span
from loramerge.ops.torch_blas import TorchBlas


class Scratch:
    """One thread's reusable buffers, grown on demand, one per name.

    A name is one buffer whatever dtype it is asked in, so uses of a name must not overlap in
    time: the update's product and the rounding's spare bits share SPARE (8 MB a worker less
    with a large rank, where the product is formed apart).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, numpy.ndarray] = {}

    def get(self, name: str, count: int, dtype: type) -> numpy.ndarray:
        nbytes = count * numpy.dtype(dtype).itemsize
        found = self._buffers.get(name)
        if found is None or found.nbytes < nbytes:
            found = numpy.empty(nbytes, dtype=numpy.uint8)
            self._buffers[name] = found
        return found[:nbytes].view(dtype)


SPARE = "spare"  # the product of a tile, then the bits its rounding works in


def add_update(
    blas: TorchBlas,
    wide: numpy.ndarray,
    factors: tuple[numpy.ndarray, numpy.ndarray, float],
    start: int,
    stop: int,
    scratch: Scratch,
) -> None:
    """wide (rows start:stop of the base, float32, out rows x in) += rows start:stop of
    s * B @ A, with the bits of `base + (B @ A) * s` formed over the whole product's rows."""
    lora_b, lora_a, scale = factors
    columns = lora_a.shape[1]
    low, high = product_span(start, stop, lora_b.shape[0])
    fused = scale == 1.0 and (low, high) == (start, stop)
    if fused and fused_keeps_bits(blas, stop - start, columns, lora_a.shape[0]):
        blas.addmm(wide, lora_b[start:stop], lora_a, 1.0)
        return
    product = scratch.get(SPARE, (high - low) * columns, numpy.float32)
    product = blas.addmm(product.reshape(high - low, columns), lora_b[low:high], lora_a, 0.0)
    delta = product[start - low : stop - low]
    if scale != 1.0:
        numpy.multiply(delta, numpy.float32(scale), out=delta)
    numpy.add(wide, delta, out=wide)


@functools.cache
def _fused_probe(blas: TorchBlas, rows: int, columns: int, rank: int) -> bool:
    generator = numpy.random.default_rng(rows * 7919 + columns * 31 + rank)
    # drawn in float32 directly: float64 draws of a wide rank-256 shape held 55 MB at once
    lora_b = generator.standard_normal((rows, rank), dtype=numpy.float32)
    lora_a = generator.standard_normal((rank, columns), dtype=numpy.float32)
    base = generator.standard_normal((rows, columns), dtype=numpy.float32)
    base *= numpy.float32(math.sqrt(rank))
    product = blas.addmm(numpy.empty((rows, columns), numpy.float32), lora_b, lora_a, 0.0)
    fused = blas.addmm(base.copy(), lora_b, lora_a, 1.0)
    same = numpy.array_equal(fused.view(numpy.uint32), (base + product).view(numpy.uint32))
    return bool(same)


def fused_keeps_bits(blas: TorchBlas, rows: int, columns: int, rank: int) -> bool:
    """Whether `out += B @ A` in one call rounds like the product added afterwards, at this
    shape on this machine (the inner dimension decides how sums form, so at most 256 rows are
    tried)."""
    return _fused_probe(blas, min(rows, 256), columns, rank)


def prescaled_factors(
    lora_b: numpy.ndarray, lora_a: numpy.ndarray, scale: float
) -> tuple[numpy.ndarray, numpy.ndarray, float]:
    """(B, A', s') with B @ A' * s' equal to (B @ A) * s bit for bit: a power-of-two scale
    >= 1 moved into A where that is provably exact (the argument: ops.update.prescaled_factors)."""
    if scale == 1.0 or not _power_of_two_at_least_one(scale):
        return lora_b, lora_a, scale
    smallest_b, smallest_a = _smallest_exponent(lora_b), _smallest_exponent(lora_a)
    if smallest_b is None or smallest_a is None:
        return lora_b, lora_a, scale
    largest = _largest_magnitude(lora_b) * _largest_magnitude(lora_a)
    largest *= lora_a.shape[0] * scale
    normal = min(smallest_b, smallest_a) >= -126
    if not normal or smallest_b + smallest_a - 46 < -149 or not largest < 2.0**126:
        return lora_b, lora_a, scale
    return lora_b, lora_a * numpy.float32(scale), 1.0


def _largest_magnitude(values: numpy.ndarray) -> float:
    """max |x| without an array of magnitudes (NaN when any element is NaN)."""
    return float(max(values.max(), -values.min()))


def _power_of_two_at_least_one(value: float) -> bool:
    mantissa, exponent = math.frexp(value)
    return mantissa == 0.5 and exponent >= 1


def _smallest_exponent(values: numpy.ndarray) -> int | None:
    magnitudes = numpy.abs(values)
    magnitudes[magnitudes == 0] = numpy.inf
    smallest = float(magnitudes.min()) if magnitudes.size else math.inf
    if smallest == math.inf:
        return None
    return math.frexp(smallest)[1] - 1
