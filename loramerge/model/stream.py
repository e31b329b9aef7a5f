"""The merge executor: streams a plan tensor by tensor, in row tiles, through the writer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramerge.adapter import Adapter
from loramerge.model.folder import BaseModel
from loramerge.model.plan import Action, MergePlan, TensorPlan
from loramerge.ops.update import TRANSPOSED, dora_rescale, output_norms_squared, update_rows
from loramerge.safetensors_io import (
    OutputTensor,
    SafetensorsReader,
    StreamingWriter,
    torch_dtype,
)

TILE_BYTES = 32 << 20  # float32 bytes of one tile of rows
Progress = Callable[[int, int], None]


@dataclass
class ModuleStats:
    """What rounding did to one module's update: elements changed vs the rounded base."""

    module: str
    tensor: str
    elements: int = 0
    changed: int = 0

    @property
    def changed_share(self) -> float:
        return self.changed / self.elements if self.elements else 0.0


@dataclass
class StreamResult:
    bytes_written: int = 0
    modules: dict[str, ModuleStats] = field(default_factory=dict)


class Sources:
    """Open readers of the base shards, and the adapter's full tensors."""

    def __init__(self, base: BaseModel, adapter: Adapter, stack: ExitStack) -> None:
        self._locate = base.locate()
        self._readers: dict[str, SafetensorsReader] = {}
        self._base = base
        self._adapter = adapter
        self._stack = stack

    def reader(self, name: str) -> tuple[SafetensorsReader, str]:
        shard, _ = self._locate[name]
        if shard not in self._readers:
            self._readers[shard] = self._stack.enter_context(
                SafetensorsReader(self._base.shard_path(shard))
            )
        return self._readers[shard], name

    def rows(self, plan: TensorPlan, start: int, stop: int) -> torch.Tensor:
        """Rows of the value the plan starts from: an adapter table or the base tensor."""
        if plan.adapter_tensor is not None:
            full = (
                self._adapter.base_tables.get(plan.adapter_tensor)
                or self._adapter.modules_to_save[plan.adapter_tensor]
            )
            return full.load()[start:stop]
        reader, name = self.reader(plan.source or plan.name)
        return reader.read(name, (start, stop))


def _tile_rows(shape: tuple[int, ...]) -> int:
    row_elements = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, TILE_BYTES // (4 * max(1, row_elements)))


def _tiles(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    rows = shape[0] if shape else 1
    step = _tile_rows(shape)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)] or [(0, 0)]


def stream_plan(
    plan: MergePlan,
    base: BaseModel,
    adapter: Adapter,
    out_dir: Path,
    progress: Progress | None = None,
) -> StreamResult:
    """Write every shard of the plan into out_dir; the caller makes out_dir atomic."""
    result = StreamResult()
    total = plan.total_bytes
    metadata = {"format": "pt"}
    with ExitStack() as stack:
        sources = Sources(base, adapter, stack)
        for shard in plan.shards:
            layout = [OutputTensor(t.name, t.dtype, t.shape) for t in shard.tensors]
            with StreamingWriter(out_dir / shard.file_name, layout, metadata) as writer:
                for tensor in shard.tensors:
                    _write_tensor(tensor, writer, sources, adapter, result)
                    result.bytes_written += tensor.nbytes
                    if progress is not None:
                        progress(result.bytes_written, total)
    return result


def _write_tensor(
    plan: TensorPlan,
    writer: StreamingWriter,
    sources: Sources,
    adapter: Adapter,
    result: StreamResult,
) -> None:
    out_dtype = torch_dtype(plan.dtype)
    if plan.action is Action.COPY:
        reader, name = sources.reader(plan.source or plan.name)
        entry = reader.entry(name)
        writer.copy_range(reader.fd, reader.absolute_offset(entry), entry.nbytes)
    elif plan.action in (Action.CAST, Action.REPLACE):
        for start, stop in _tiles(plan.shape):
            writer.write_tensor(sources.rows(plan, start, stop).to(out_dtype))
    elif plan.action is Action.BIAS:
        module = adapter.modules[plan.module or ""]
        base_bias = sources.rows(plan, 0, plan.shape[0]).to(torch.float32)
        assert module.bias is not None
        merged = base_bias + module.bias.float() * module.scale
        writer.write_tensor(merged.to(out_dtype))
    else:
        _write_merge(plan, writer, sources, adapter, result)


def merged_tiles(
    plan: TensorPlan, sources: Sources, adapter: Adapter
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(base rows, merged float32 rows) tile by tile for a MERGE plan, DoRA applied."""
    module = adapter.modules[plan.module or ""]
    kind = plan.kind
    assert kind is not None
    lora_b, lora_a = module.factors()
    scale = module.scale
    row_shape = tuple(plan.shape[1:]) if len(plan.shape) > 2 else ()

    def merged(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        base_rows = sources.rows(plan, start, stop)
        update = update_rows(lora_b, lora_a, scale, kind, start, stop, row_shape)
        return base_rows, base_rows.to(torch.float32) + update

    magnitude = module.magnitude.float().reshape(-1) if module.magnitude is not None else None
    norms = None
    if magnitude is not None and kind in TRANSPOSED:
        # DoRA normalises each output, a column of a transposed table: one pass to sum squares
        squares = torch.zeros(magnitude.numel(), dtype=torch.float64)
        for start, stop in _tiles(plan.shape):
            squares += output_norms_squared(merged(start, stop)[1], kind)
        norms = squares.sqrt()
    for start, stop in _tiles(plan.shape):
        base_rows, values = merged(start, stop)
        if magnitude is not None:
            if norms is not None:
                values = dora_rescale(values, magnitude, norms, kind)
            else:
                tile_norms = output_norms_squared(values, kind).sqrt()
                values = dora_rescale(values, magnitude[start:stop], tile_norms, kind)
        yield base_rows, values


def _write_merge(
    plan: TensorPlan,
    writer: StreamingWriter,
    sources: Sources,
    adapter: Adapter,
    result: StreamResult,
) -> None:
    stats = result.modules.setdefault(plan.module or "", ModuleStats(plan.module or "", plan.name))
    out_dtype = torch_dtype(plan.dtype)
    for base_rows, values in merged_tiles(plan, sources, adapter):
        rounded = values.to(out_dtype)
        stats.elements += rounded.numel()
        stats.changed += int((rounded != base_rows.to(out_dtype)).sum())
        writer.write_tensor(rounded)
