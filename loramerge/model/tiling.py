"""How a merge cuts a tensor into tiles of rows (torch-free: both merge engines use it)."""

from __future__ import annotations

import itertools
import math

from loramerge.ops.spans import MIN_PRODUCT_SPAN

TILE_BYTES = 8 << 20  # float32 bytes of one tile of rows: bounds memory, large enough for BLAS
# tiles at least as wide as the products the update computes, so that none needs a wider one
MIN_TILE_ROWS = MIN_PRODUCT_SPAN


def _tile_rows(shape: tuple[int, ...]) -> int:
    row_elements = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, TILE_BYTES // (4 * max(1, row_elements)))


def tiles(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges of about TILE_BYTES of float32 each, never fewer than MIN_TILE_ROWS rows.

    Tiles are balanced (no narrow remainder): BLAS sums narrow products in another order than
    the whole matrix product, so a narrow tile's update has to be computed over a wider range
    and cut out (`product_span`), which balanced tiles of MIN_TILE_ROWS rows never need.
    """
    rows = shape[0] if shape else 1
    count = max(1, rows // max(MIN_TILE_ROWS, _tile_rows(shape)))
    bounds = [rows * i // count for i in range(count + 1)]
    return list(itertools.pairwise(bounds))
