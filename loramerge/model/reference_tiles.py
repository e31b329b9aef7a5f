"""What a merge writes for each planned tensor, tile by tile, before it is rounded to the output
dtype: the values `verify` compares a merged folder with (the torch engine's own arithmetic,
model.merged_tiles, so the two cannot drift apart)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loramerge.adapter import Adapter
from loramerge.io.safetensors_header import torch_dtype
from loramerge.model.merged_tiles import merged_bias, merged_tiles
from loramerge.model.plan import Action, TensorPlan
from loramerge.model.sources import Sources
from loramerge.model.tiling import tiles


@dataclass(frozen=True)
class ReferenceTile:
    """Rows start:stop of a planned tensor: the base's rows (None where the tensor does not
    come from the base) and the values the merge rounds into the output."""

    start: int
    stop: int
    base: torch.Tensor | None
    values: torch.Tensor


def reference_tiles(
    plan: TensorPlan, sources: Sources, adapter: Adapter
) -> Iterator[ReferenceTile]:
    """Every tile of `plan` in row order. A tile's buffers go back to the sources' pool when the
    next one is asked for: use each before moving on."""
    if plan.action is Action.MERGE:
        for (start, stop), (base_rows, values) in zip(
            tiles(plan.tile_shape), merged_tiles(plan, sources, adapter), strict=True
        ):
            yield ReferenceTile(start, stop, base_rows, values)
            sources.give(base_rows, values)
        return
    if plan.action is Action.BIAS:
        stored = sources.rows(plan, 0, plan.shape[0])
        yield ReferenceTile(0, plan.shape[0], stored, merged_bias(plan, stored, adapter))
        sources.give(stored)
        return
    out_dtype = torch_dtype(plan.dtype)
    for start, stop in tiles(plan.tile_shape):
        stored = sources.rows(plan, start, stop)
        values = stored
        if plan.action is Action.ROWS:
            values = stored.to(out_dtype).clone()
            sources.write_token_rows(plan, values, start, stop)
        base = None if plan.action is Action.REPLACE else stored
        yield ReferenceTile(start, stop, base, values)
        sources.give(stored)
