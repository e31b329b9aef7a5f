"""The dense update of one LoRA module in its base tensor's stored layout, a tile of rows at a time.

Layouts (docs/rules.md section 1): LINEAR and CONV tensors have one row per output; CONV1D
(GPT-2, in x out) and EMBEDDING (num x dim) tables are stored transposed, one row per input.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from loramerge.ops.spans import product_span

Empty = Callable[[tuple[int, ...], "torch.dtype"], "torch.Tensor"]


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def update_rows(
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    scale: float,
    transposed: bool,
    start: int,
    stop: int,
    row_shape: tuple[int, ...] = (),
    empty: Empty = _empty,
) -> torch.Tensor:
    """Rows start:stop of s * B @ A in the stored layout, float32, with the bits of the same
    rows of the whole product.

    `lora_b` is (out x r) and `lora_a` (r x in) as float32 matrices (conv factors flattened);
    `row_shape` is the shape of one stored row for conv, e.g. (in, kh, kw); `empty` makes
    the product's tensor. The product is formed as (B @ A) then scaled, PEFT's order of
    operations.
    """
    if transposed:
        low, high = product_span(start, stop, lora_a.shape[1])
        product = empty((lora_b.shape[0], high - low), torch.float32)
        torch.mm(lora_b, lora_a[:, low:high], out=product)
        return _scaled(product[:, start - low : stop - low], scale).T
    low, high = product_span(start, stop, lora_b.shape[0])
    product = empty((high - low, lora_a.shape[1]), torch.float32)
    torch.mm(lora_b[low:high], lora_a, out=product)
    rows = _scaled(product[start - low : stop - low], scale)
    if row_shape:
        rows = rows.reshape(stop - start, *row_shape)
    return rows


def add_update_in_place(
    wide: torch.Tensor,
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    scale: float,
    transposed: bool,
    start: int,
    stop: int,
) -> bool:
    """Add rows start:stop of B @ A to the float32 tile `wide` in one fused matrix product when
    that gives the bits of `wide + update_rows(...)`; False (and `wide` untouched) otherwise.

    The fused product saves writing the update to a buffer and reading it back. It keeps the
    bits when the kernel sums each dot product from zero and adds it to the base value once,
    which is what GEMM kernels do within one block of the inner dimension, but not what they
    do for one row or rank 1 (a fused multiply-add into the base) nor, possibly, on other BLAS
    builds; so each tile shape is first probed against the separate form on this machine, and
    tiles narrower than the product's span (see `product_span`) are left to it. Only
    unit scales qualify (a scale rounds the product a second time first), and only row layouts
    (the transposed product may sum in another order).
    """
    if scale != 1.0 or transposed:
        return False
    if product_span(start, stop, lora_b.shape[0]) != (start, stop):
        return False  # too few rows for the kernel of the whole product
    rows = wide.view(stop - start, -1)
    shape = (rows.shape[0], rows.shape[1], lora_a.shape[0])
    if not _fused_keeps_bits(*shape, torch.get_num_threads()):
        return False
    rows.addmm_(lora_b[start:stop], lora_a)
    return True


@functools.cache
def _fused_keeps_bits(rows: int, columns: int, rank: int, threads: int) -> bool:
    """Whether this machine's fused product rounds like product-then-add at this shape, tried
    on random values whose sums cancel and round often (a kernel that rounds differently
    differs on a large share of such elements)."""
    generator = torch.Generator().manual_seed(rows * 7919 + columns * 31 + rank)
    rows = min(rows, 256)  # the inner dimension decides how sums are formed, not the row count
    lora_b = torch.randn(rows, rank, generator=generator)
    lora_a = torch.randn(rank, columns, generator=generator)
    base = torch.randn(rows, columns, generator=generator) * math.sqrt(rank)
    separate = base + lora_b @ lora_a
    fused = base.addmm_(lora_b, lora_a)
    return torch.equal(fused.view(torch.int32), separate.view(torch.int32))


def prescaled_factors(
    lora_b: torch.Tensor, lora_a: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A', s') with B @ A' * s' equal to (B @ A) * s bit for bit, saving the pass that
    scales every product element where that can be guaranteed: s a power of two >= 1 is moved
    into A (A' = s * A, s' = 1).

    Why it is exact: multiplying by 2^k is exact, and every product and partial sum of B @ A'
    is 2^k times the one of B @ A, so each rounding rounds the same significand, unless a value
    overflows or falls below the normal range (where rounding steps stop scaling). Every exact
    partial sum is a multiple of Q = 2^(eB + eA - 46), eB and eA the smallest exponents among
    the nonzero entries; if Q >= 2^-149, any such value in the subnormal range is representable,
    so no rounding happens there. The overflow bound is checked on the largest possible sum.
    """
    if scale == 1.0 or not _power_of_two_at_least_one(scale):
        return lora_b, lora_a, scale
    smallest_b, smallest_a = _smallest_exponent(lora_b), _smallest_exponent(lora_a)
    if smallest_b is None or smallest_a is None:
        return lora_b, lora_a, scale  # a zero factor: nothing to save
    largest = float(lora_b.abs().max()) * float(lora_a.abs().max()) * lora_a.shape[0] * scale
    normal = min(smallest_b, smallest_a) >= -126
    if not normal or smallest_b + smallest_a - 46 < -149 or not largest < 2.0**126:
        return lora_b, lora_a, scale
    return lora_b, lora_a * scale, 1.0


def _power_of_two_at_least_one(value: float) -> bool:
    mantissa, exponent = math.frexp(value)
    return mantissa == 0.5 and exponent >= 1


def _smallest_exponent(tensor: torch.Tensor) -> int | None:
    """floor(log2 |x|) of the smallest nonzero |x|, or None when all are zero."""
    magnitudes = tensor.abs()
    # masked_fill + min: boolean indexing costs ~20x more on every module of a merge
    smallest = float(magnitudes.masked_fill_(magnitudes == 0, math.inf).min())
    if smallest == math.inf:
        return None
    return math.frexp(smallest)[1] - 1


def _scaled(product: torch.Tensor, scale: float) -> torch.Tensor:
    # x * 1.0 == x bit for bit, so a unit scale skips a pass over the tile
    return product if scale == 1.0 else product.mul_(scale)


def output_norms_squared(merged_rows: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Per-output squared L2 norms of a tile of the merged weight, in float64.

    For row layouts each row is one output; for transposed layouts the tile contributes a
    partial sum to every output (column), to be added up over all tiles.
    """
    tile = merged_rows.to(torch.float64)
    if transposed:
        return (tile * tile).sum(dim=0)
    return (tile * tile).reshape(tile.shape[0], -1).sum(dim=1)


def dora_rescale(
    merged_rows: torch.Tensor,
    magnitude: torch.Tensor,
    norms: torch.Tensor,
    transposed: bool,
) -> torch.Tensor:
    """W' = (m / ||V||) * V per output, for a tile of V; `magnitude` and `norms` cover the
    tile's outputs (row layouts) or all outputs (transposed layouts)."""
    factor = (magnitude.to(torch.float64) / norms).to(torch.float32)
    if transposed:
        return merged_rows * factor.reshape(1, -1)
    return merged_rows * factor.reshape(-1, *([1] * (merged_rows.dim() - 1)))
