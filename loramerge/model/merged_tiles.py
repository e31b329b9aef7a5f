"""A MERGE or BIAS plan's merged values before rounding, tile by tile: float32(base) plus the
update (DoRA applied), shared by the torch engine (loramerge.model.stream), `inspect` and the
reference tiles `verify` compares with."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from loramerge.adapter import Adapter, LoraModule
from loramerge.model.dense_tiles import dense_bias, dense_tiles
from loramerge.model.plan import TensorPlan, UpdateSlice
from loramerge.model.sources import Sources
from loramerge.model.tiling import tiles
from loramerge.ops.update import (
    add_update_in_place,
    dora_rescale,
    output_norms_squared,
    prescaled_factors,
    update_rows,
)


def merged_tiles(
    plan: TensorPlan, sources: Sources, adapter: Adapter
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(base rows, merged float32 rows) tile by tile for a MERGE plan, DoRA applied.

    Both may live in the sources' pool: a caller done with a tile may give them back.
    """
    if plan.dense:  # a dense update's rule (model/dense_tiles)
        return (yield from dense_tiles(plan, sources, adapter))
    module = adapter.modules[plan.module or ""]
    update = plan.update
    assert update is not None
    experts = range(update.stacked) if update.stacked else [update.expert]
    factors = [_sliced_factors(module, update, expert) for expert in experts]
    transposed, row_shape = update.transposed, update.row_shape
    per_expert = _stored_rows(update)

    def add(wide: torch.Tensor, factor: tuple, start: int, stop: int) -> None:
        lora_b, lora_a, scale = factor
        if add_update_in_place(wide, lora_b, lora_a, scale, transposed, start, stop):
            return
        delta = update_rows(
            lora_b, lora_a, scale, transposed, start, stop, row_shape, sources.pool.take_like
        )
        # float32(base) + update, in place (addition commutes, so PEFT's bits are kept)
        wide.add_(delta)
        sources.give(delta)

    def merged(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        base_rows, wide = sources.rows_and_float32(plan, start, stop)
        sources.write_token_rows(plan, wide, start, stop)
        if not update.stacked:
            add(wide, factors[0], start, stop)
            return base_rows, wide
        # the tile's rows, expert by expert: each segment gets its own expert's update rows
        for expert in range(start // per_expert, -(-stop // per_expert)):
            low, high = max(start, expert * per_expert), min(stop, (expert + 1) * per_expert)
            segment = wide[low - start : high - start]
            add(segment, factors[expert], low - expert * per_expert, high - expert * per_expert)
        return base_rows, wide

    magnitude = module.magnitude.float().reshape(-1) if module.magnitude is not None else None
    norms = None
    if magnitude is not None and transposed:
        norms = _column_norms(plan, merged, sources, magnitude.numel())
    for start, stop in tiles(plan.tile_shape):
        base_rows, values = merged(start, stop)
        if magnitude is not None:
            if norms is None:
                tile_norms = output_norms_squared(values, transposed).sqrt()
                rescaled = dora_rescale(values, magnitude[start:stop], tile_norms, transposed)
            else:
                rescaled = dora_rescale(values, magnitude, norms, transposed)
            sources.give(values)
            values = rescaled
        yield base_rows, values


def _column_norms(
    plan: TensorPlan,
    merged: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    sources: Sources,
    outputs: int,
) -> torch.Tensor:
    """DoRA normalises each output, a column of a transposed table: one pass over the merged
    tiles to sum its squares."""
    squares = torch.zeros(outputs, dtype=torch.float64)
    for start, stop in tiles(plan.tile_shape):
        base_rows, values = merged(start, stop)
        squares += output_norms_squared(values, True)
        sources.give(base_rows, values)
    return squares.sqrt()


def merged_bias(plan: TensorPlan, stored: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """A BIAS plan's merged values before rounding: the base bias plus s x the LoRA bias, or a
    dense update's bias rule."""
    if plan.dense:
        return dense_bias(plan, stored, adapter)
    module = adapter.modules[plan.module or ""]
    assert module.bias is not None
    return stored.to(torch.float32) + module.bias.float() * module.scale


def _sliced_factors(module: LoraModule, update: UpdateSlice, expert: int | None) -> tuple:
    """(B, A, s) for the part of the update the stored tensor holds (one expert's, a range of
    rows or columns), with a power-of-two scale moved into A where that keeps every bit."""
    lora_b, lora_a = module.factors(keep=False, expert=expert)
    if update.rows != (0, lora_b.shape[0]):
        lora_b = lora_b[update.rows[0] : update.rows[1]]
    if update.columns != (0, lora_a.shape[1]):
        lora_a = lora_a[:, update.columns[0] : update.columns[1]]
    return prescaled_factors(lora_b, lora_a, module.scale)


def _stored_rows(update: UpdateSlice) -> int:
    """Stored rows of one expert's matrix (its product columns when stored transposed)."""
    low, high = update.columns if update.transposed else update.rows
    return high - low
