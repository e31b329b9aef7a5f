"""Where the merge executor's input rows come from: the base shards, read in row tiles in a
planned order (ahead of use when a prefetcher is attached), and the adapter's own tables."""

from __future__ import annotations

import math
import threading
from contextlib import ExitStack

import torch

from loramerge.adapter import Adapter, LazyTensor
from loramerge.io.buffers import BufferPool
from loramerge.io.direct_io import BLOCK
from loramerge.io.safetensors_header import itemsize
from loramerge.io.safetensors_reader import SafetensorsReader
from loramerge.model.folder import BaseModel
from loramerge.model.pipeline import Prefetcher
from loramerge.model.plan import Action, MergePlan, TensorPlan
from loramerge.model.tiling import tiles

# (tensor name, first row, end row, whether a float32 copy is wanted too)
ReadKey = tuple[str, int, int, bool]
# a tile as read, and its float32 copy when one was asked for
Rows = tuple["torch.Tensor", "torch.Tensor | None"]


def tile_buffer_bytes(plan: MergePlan, base: BaseModel) -> tuple[int, int]:
    """The largest buffers one tile of the plan needs: (its rows as stored, plus the block
    padding of a direct read; their float32 copy)."""
    located = base.locate()
    stored_bytes = widened_bytes = BLOCK
    for shard in plan.shards:
        for tensor in shard.tensors:
            shape = tensor.tile_shape
            row_elements = math.prod(shape[1:]) if len(shape) > 1 else 1
            source = located.get(tensor.source or tensor.name)
            stored = itemsize(source[1].dtype if source else tensor.dtype)
            for start, stop in tiles(shape):
                elements = (stop - start) * row_elements
                stored_bytes = max(stored_bytes, elements * stored + 2 * BLOCK)
                widened_bytes = max(widened_bytes, elements * 4)
    return stored_bytes, widened_bytes


def read_schedule(plan: MergePlan, adapter: Adapter, copies_read: bool = False) -> list[ReadKey]:
    """Every base row range the executor will read, in the order it reads them; with
    `copies_read`, untouched tensors are read too instead of copied kernel-side."""
    skipped = (Action.REPLACE,) if copies_read else (Action.COPY, Action.REPLACE)
    schedule: list[ReadKey] = []
    for shard in plan.shards:
        for tensor in shard.tensors:
            if tensor.adapter_tensor is not None or tensor.action in skipped:
                continue
            source = tensor.source or tensor.name
            if tensor.action is Action.BIAS:
                schedule.append((source, 0, tensor.shape[0], False))
                continue
            merged = tensor.action is Action.MERGE
            passes = 1
            if merged and tensor.update is not None and tensor.update.transposed:
                module = adapter.modules.get(tensor.module or "")  # None: a dense update
                passes += module is not None and module.magnitude is not None
            for _ in range(passes):
                schedule.extend((source, a, b, merged) for a, b in tiles(tensor.tile_shape))
    return schedule


class Sources:
    """Open readers of the base shards, and the adapter's full tensors.

    With `direct`, shards are read with direct I/O where possible and untouched tensors are
    meant to be read and written like the others instead of copied kernel-side. Tiles live in
    `pool` buffers: whoever is done with a tile may give them back.
    """

    def __init__(
        self,
        base: BaseModel,
        adapter: Adapter,
        stack: ExitStack,
        buffer_bytes: tuple[int, int],
        direct: bool = False,
    ) -> None:
        self._locate = base.locate()
        self._direct = direct
        self._readers: dict[str, SafetensorsReader] = {}
        self._base = base
        self._adapter = adapter
        self._stack = stack
        self._lock = threading.Lock()
        self.pool = BufferPool(*buffer_bytes)
        self.prefetcher: Prefetcher | None = None
        # tensors read as rows of this many elements rather than along their first dimension
        self.row_elements: dict[str, int] = {}

    @property
    def direct(self) -> bool:
        return self._direct

    def reader(self, name: str) -> tuple[SafetensorsReader, str]:
        shard, _ = self._locate[name]
        with self._lock:
            if shard not in self._readers:
                self._readers[shard] = self._stack.enter_context(
                    SafetensorsReader(
                        self._base.shard_path(shard), direct=self._direct, allocate=self.pool.take
                    )
                )
            return self._readers[shard], name

    def read(self, key: ReadKey) -> torch.Tensor:
        """One tile as stored."""
        name, start, stop, _ = key
        reader, name = self.reader(name)
        return reader.read(name, (start, stop), self.row_elements.get(name))

    def prepare(self, key: ReadKey, stored: torch.Tensor) -> Rows:
        """A tile read by `read`, with its float32 copy when the key asks for one."""
        return stored, self._widen(stored) if key[3] else None

    def _widen(self, stored: torch.Tensor) -> torch.Tensor:
        return self.pool.take_like(stored.shape, torch.float32).copy_(stored)

    def rows(self, plan: TensorPlan, start: int, stop: int) -> torch.Tensor:
        """Rows of the value the plan starts from: an adapter table or the base tensor."""
        return self._rows(plan, start, stop, False)[0]

    def rows_and_float32(
        self, plan: TensorPlan, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows as stored and a float32 copy that the caller may modify in place."""
        stored, wide = self._rows(plan, start, stop, True)
        return stored, wide if wide is not None else self._widen(stored)

    def _rows(self, plan: TensorPlan, start: int, stop: int, widen: bool) -> Rows:
        if plan.adapter_tensor is not None:
            return self._adapter_tensor(plan.adapter_tensor).load()[start:stop], None
        key = (plan.source or plan.name, start, stop, widen)
        if self.prefetcher is not None:
            return self.prefetcher.take(key)
        return self.prepare(key, self.read(key))

    def _adapter_tensor(self, key: str) -> LazyTensor:
        for carried in (
            self._adapter.base_tables,
            self._adapter.modules_to_save,
            self._adapter.saved_biases,
        ):
            if key in carried:
                return carried[key]
        raise KeyError(key)

    def write_token_rows(self, plan: TensorPlan, tile: torch.Tensor, start: int, stop: int) -> None:
        """Write the adapter's trained token rows that fall in rows start:stop over `tile`."""
        if plan.token_rows is None:
            return
        rows = self._adapter.token_rows[plan.token_rows]
        values = rows.values.load()
        for position, index in enumerate(rows.indices):
            if start <= index < stop:
                tile[index - start] = values[position].to(tile.dtype)

    def give(self, *tensors: torch.Tensor) -> None:
        """Tiles the caller is done with: their buffers may hold the next ones."""
        for tensor in tensors:
            self.pool.give(tensor)


def sources_for(
    plan: MergePlan, base: BaseModel, stack: ExitStack, direct: bool = False
) -> Sources:
    """The sources a plan's tensors are read from, with buffers sized for its tiles."""
    sources = Sources(base, plan.adapter, stack, tile_buffer_bytes(plan, base), direct)
    for shard in plan.shards:
        for tensor in shard.tensors:
            if tensor.tile_shape != tensor.shape:
                sources.row_elements[tensor.source or tensor.name] = tensor.tile_shape[1]
    return sources
