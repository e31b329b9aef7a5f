"""The dense update of one LoRA module in its base tensor's stored layout, a tile of rows at a time.

Layouts (rules.md section 1): LINEAR and CONV2D tensors have one row per output; CONV1D
(GPT-2, in x out) and EMBEDDING (num x dim) tables are stored transposed, one row per input.
"""

from __future__ import annotations

import torch

from loramerge.adapter import ModuleKind

TRANSPOSED = frozenset({ModuleKind.CONV1D, ModuleKind.EMBEDDING})


def update_rows(
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    scale: float,
    kind: ModuleKind,
    start: int,
    stop: int,
    row_shape: tuple[int, ...] = (),
) -> torch.Tensor:
    """Rows start:stop of s * B @ A in the stored layout, float32.

    `lora_b` is (out x r) and `lora_a` (r x in) as float32 matrices (conv2d factors flattened);
    `row_shape` is the shape of one stored row for conv2d, e.g. (in, kh, kw).
    The product is formed as (B @ A) then scaled, PEFT's order of operations.
    """
    if kind in TRANSPOSED:
        return _scaled(lora_b @ lora_a[:, start:stop], scale).T
    rows = _scaled(lora_b[start:stop] @ lora_a, scale)
    if row_shape:
        rows = rows.reshape(stop - start, *row_shape)
    return rows


def _scaled(product: torch.Tensor, scale: float) -> torch.Tensor:
    # x * 1.0 == x bit for bit, so a unit scale skips a pass over the tile
    return product if scale == 1.0 else product.mul_(scale)


def output_norms_squared(merged_rows: torch.Tensor, kind: ModuleKind) -> torch.Tensor:
    """Per-output squared L2 norms of a tile of the merged weight, in float64.

    For row layouts each row is one output; for transposed layouts the tile contributes a
    partial sum to every output (column), to be added up over all tiles.
    """
    tile = merged_rows.to(torch.float64)
    if kind in TRANSPOSED:
        return (tile * tile).sum(dim=0)
    return (tile * tile).reshape(tile.shape[0], -1).sum(dim=1)


def dora_rescale(
    merged_rows: torch.Tensor,
    magnitude: torch.Tensor,
    norms: torch.Tensor,
    kind: ModuleKind,
) -> torch.Tensor:
    """W' = (m / ||V||) * V per output, for a tile of V; `magnitude` and `norms` cover the
    tile's outputs (row layouts) or all outputs (transposed layouts)."""
    factor = (magnitude.to(torch.float64) / norms).to(torch.float32)
    if kind in TRANSPOSED:
        return merged_rows * factor.reshape(1, -1)
    return merged_rows * factor.reshape(-1, *([1] * (merged_rows.dim() - 1)))
