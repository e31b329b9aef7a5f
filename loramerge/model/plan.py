"""What a merge will write: every output tensor, shard by shard, and the action that makes it.

loramerge.model.planner makes a plan from base headers and an adapter; the stream executes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from loramerge.adapter import Adapter, ModuleKind
from loramerge.io.safetensors_header import itemsize
from loramerge.model.param_changes import (
    apply_config_updates,
)


class Action(str, Enum):
    COPY = "copy"  # bytes unchanged
    CAST = "cast"  # same values in another dtype
    MERGE = "merge"  # base + LoRA update (DoRA rescaled), or a dense rule, rounded once
    BIAS = "bias"  # base bias + s * LoRA bias, or a dense update's bias rule
    REPLACE = "replace"  # a full tensor the adapter carries
    ROWS = "rows"  # the base with trained token rows written over it


@dataclass(frozen=True)
class UpdateSlice:
    """The part of a module's update s * B @ A (out x in, per expert for a stack of experts)
    that one stored tensor receives: its rows and columns of the product, and whether the
    stored rows are the product's columns (Conv1D, embeddings, experts held as (in, out))."""

    expert: int | None
    rows: tuple[int, int]
    columns: tuple[int, int]
    transposed: bool = False
    row_shape: tuple[int, ...] = ()  # conv: the shape of one stored row, e.g. (in, kh, kw)
    # a whole stack of experts stored as one (E x ...) tensor: every expert's update in turn,
    # the stored rows being those of the experts one after the other
    stacked: int = 0


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor. `source` is the base tensor read; `adapter_tensor` names a full tensor
    of the adapter (modules_to_save, trained bias or saved base table) used instead of, or as,
    the base value; `token_rows` names trained rows written over the base value. With
    `dense`, `module` is a key of the adapter's dense updates, whose rule MERGE and BIAS apply."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    action: Action
    source: str | None = None
    module: str | None = None
    kind: ModuleKind | None = None
    update: UpdateSlice | None = None
    adapter_tensor: str | None = None
    token_rows: str | None = None
    dense: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def tile_shape(self) -> tuple[int, ...]:
        """The shape the tensor is streamed as, row tile by row tile: a stack of experts as
        the rows of all its experts (its leading dimensions flattened)."""
        if self.update is not None and self.update.stacked:
            return (math.prod(self.shape[:-1]), self.shape[-1])
        return self.shape


@dataclass(frozen=True)
class ShardPlan:
    file_name: str
    tensors: tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class MergePlan:
    """Every output shard, and the adapter as fitted to the base: the module keys of the
    tensor plans are its keys (names pinned to the base's), and the stream reads it."""

    shards: tuple[ShardPlan, ...]
    adapter: Adapter
    config_updates: dict[str, Any] = field(default_factory=dict)
    untied: bool = False
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    def counts(self) -> dict[str, int]:
        counts = {action.value: 0 for action in Action}
        for shard in self.shards:
            for tensor in shard.tensors:
                counts[tensor.action.value] += 1
        return counts

    def config_for(self, config: dict[str, Any]) -> dict[str, Any]:
        """The merged model's config.json."""
        updated = {k: v for k, v in config.items() if k != "quantization_config"}
        return apply_config_updates(updated, self.config_updates)


def reshard(tensors: list[TensorPlan], max_bytes: int, single_file_name: str) -> list[ShardPlan]:
    """Greedy shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [ShardPlan(single_file_name, tuple(groups[0]))]
    count = len(groups)
    return [
        ShardPlan(f"model-{i + 1:05d}-of-{count:05d}.safetensors", tuple(group))
        for i, group in enumerate(groups)
    ]
