"""How wide a product is formed so that its bits do not depend on how a merge is tiled (torch-free:
both merge engines use it)."""

from __future__ import annotations

# Products only a few rows or columns wide go to other kernels than wide ones, which sum each
# dot product in another order (MKL on an AMD EPYC: fewer than 4 rows or 12 columns), so a
# narrow tile's product would not be the same slice of B @ A as PEFT's whole-matrix product.
# Products are therefore formed over at least this many rows or columns and cut down.
MIN_PRODUCT_SPAN = 64


def product_span(start: int, stop: int, size: int) -> tuple[int, int]:
    """The range of the product's rows (or columns) to compute for rows start:stop out of
    `size`: start:stop itself when it spans MIN_PRODUCT_SPAN (or everything), else the nearest
    range of that width around it."""
    span = min(MIN_PRODUCT_SPAN, size)
    if stop - start >= span:
        return start, stop
    low = max(0, min(start, size - span))
    return low, max(stop, low + span)
