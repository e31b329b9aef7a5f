"""The merge executor's side of dense updates (IA3, OFT, LyCORIS full, ...): each tile of base
rows upcast to float64, the update's rule applied (loramerge.ops.dense_updates), the result
put in the float32 tile such that the writer's conversion to the output dtype rounds the
float64 value once (float32_rounding_once)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from loramerge.adapter import Adapter
from loramerge.io.safetensors_header import torch_dtype
from loramerge.model.plan import TensorPlan
from loramerge.model.sources import Sources
from loramerge.model.tiling import tiles
from loramerge.ops.dense_updates import RULES, apply_bias, float32_rounding_once


def dense_tiles(
    plan: TensorPlan, sources: Sources, adapter: Adapter
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(base rows, merged float32 rows) tile by tile for a dense MERGE plan.

    The rule's tensors are read once per weight (and not kept by the adapter); a tile of stored
    rows is a block of whole rows of W, or for a weight stored transposed (Conv1D) a block of
    whole columns, which rules that mix a row's inputs never get (model/dense_fit)."""
    update = adapter.dense_updates[plan.module or ""]
    where = plan.update
    assert where is not None
    shape = (where.rows[1], where.columns[1])
    rule = RULES[update.rule]
    out_dtype = torch_dtype(plan.dtype)
    values = {name: tensor.read() for name, tensor in update.tensors.items()}
    prepared = rule.prepare(values, update.params, shape)
    del values
    for start, stop in tiles(plan.tile_shape):
        base_rows, wide = sources.rows_and_float32(plan, start, stop)
        rows = wide.view(stop - start, -1)
        block = rows.to(torch.float64)
        if where.transposed:
            merged = rule.apply(block.T, prepared, (0, shape[0]), (start, stop)).T
        else:
            merged = rule.apply(block, prepared, (start, stop), (0, shape[1]))
        rows.copy_(float32_rounding_once(merged, out_dtype))
        yield base_rows, wide


def dense_bias(plan: TensorPlan, stored: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """The bias a dense update changes (b + d, or b * l), as float32."""
    update = adapter.dense_updates[plan.module or ""]
    assert update.bias is not None
    values = {name: tensor.read() for name, tensor in update.tensors.items()}
    merged = apply_bias(update.bias, stored, values)
    return float32_rounding_once(merged, torch_dtype(plan.dtype))


def dense_support(plan: TensorPlan, adapter: Adapter) -> int | None:
    """How many elements a sparse rule can change (SHiRA's distinct positions), None for the
    dense rules: what rounding kept of a sparse update is a share of these."""
    update = adapter.dense_updates[plan.module or ""]
    if update.rule != "scatter":
        return None
    indices = update.tensors["indices"].read().long()
    width = plan.update.columns[1] if plan.update is not None else 1
    return int(torch.unique(indices[0] * width + indices[1]).numel())
