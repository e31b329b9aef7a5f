"""The merge executor: streams a plan tensor by tensor, in row tiles, through the writer."""

from __future__ import annotations

import gc
import itertools
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramerge.adapter import Adapter
from loramerge.model.folder import BaseModel
from loramerge.model.pipeline import AsyncWriter, Prefetcher
from loramerge.model.plan import Action, MergePlan, TensorPlan
from loramerge.ops.update import TRANSPOSED, dora_rescale, output_norms_squared, update_rows
from loramerge.safetensors_io import SafetensorsReader, torch_dtype
from loramerge.safetensors_writer import OutputTensor, StreamingWriter

TILE_BYTES = 8 << 20  # float32 bytes of one tile of rows: bounds memory, large enough for BLAS
MIN_TILE_ROWS = 8
# rounding that keeps fewer than this share of an update's elements changed gets a warning
ERASED_SHARE = 0.5
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


ReadKey = tuple[str, int, int]


def read_schedule(plan: MergePlan, adapter: Adapter) -> list[ReadKey]:
    """Every base row range the executor will read, in the order it reads them."""
    schedule: list[ReadKey] = []
    for shard in plan.shards:
        for tensor in shard.tensors:
            if tensor.adapter_tensor is not None or tensor.action in (Action.COPY, Action.REPLACE):
                continue
            source = tensor.source or tensor.name
            if tensor.action is Action.BIAS:
                schedule.append((source, 0, tensor.shape[0]))
                continue
            passes = 1
            if tensor.action is Action.MERGE and tensor.kind in TRANSPOSED:
                passes += adapter.modules[tensor.module or ""].magnitude is not None
            for _ in range(passes):
                schedule.extend((source, a, b) for a, b in _tiles(tensor.shape))
    return schedule


class Sources:
    """Open readers of the base shards (read ahead when a prefetcher is attached), and the
    adapter's full tensors."""

    def __init__(self, base: BaseModel, adapter: Adapter, stack: ExitStack) -> None:
        self._locate = base.locate()
        self._readers: dict[str, SafetensorsReader] = {}
        self._base = base
        self._adapter = adapter
        self._stack = stack
        self._lock = threading.Lock()
        self.prefetcher: Prefetcher | None = None

    def reader(self, name: str) -> tuple[SafetensorsReader, str]:
        shard, _ = self._locate[name]
        with self._lock:
            if shard not in self._readers:
                self._readers[shard] = self._stack.enter_context(
                    SafetensorsReader(self._base.shard_path(shard))
                )
            return self._readers[shard], name

    def read(self, key: ReadKey) -> torch.Tensor:
        name, start, stop = key
        reader, name = self.reader(name)
        return reader.read(name, (start, stop))

    def rows(self, plan: TensorPlan, start: int, stop: int) -> torch.Tensor:
        """Rows of the value the plan starts from: an adapter table or the base tensor."""
        if plan.adapter_tensor is not None:
            tables = self._adapter.base_tables
            full = tables.get(plan.adapter_tensor)
            if full is None:
                full = self._adapter.modules_to_save[plan.adapter_tensor]
            return full.load()[start:stop]
        key = (plan.source or plan.name, start, stop)
        if self.prefetcher is not None:
            return self.prefetcher.take(key)
        return self.read(key)


def _tile_rows(shape: tuple[int, ...]) -> int:
    row_elements = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, TILE_BYTES // (4 * max(1, row_elements)))


def _tiles(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges of about TILE_BYTES of float32 each, never fewer than MIN_TILE_ROWS rows.

    Tiles are balanced (no 1-row remainder) because BLAS switches to a matrix-vector kernel for
    a single row, whose float32 sums can differ in the last bit from the matrix product's.
    """
    rows = shape[0] if shape else 1
    count = max(1, rows // max(MIN_TILE_ROWS, _tile_rows(shape)))
    bounds = [rows * i // count for i in range(count + 1)]
    return list(itertools.pairwise(bounds))


class _Output:
    """Where finished bytes go: straight to the writer, or through the background writer."""

    def __init__(self, pipelined: bool, progress: Progress | None, total: int) -> None:
        self._async = AsyncWriter() if pipelined else None
        self._progress = progress
        self._total = total
        self._done = 0

    def call(self, function: Callable[..., object], *args: object) -> None:
        if self._async is None:
            function(*args)
        else:
            self._async.submit(function, *args)

    def tensor_finished(self, nbytes: int) -> None:
        self.call(self._advance, nbytes)

    def _advance(self, nbytes: int) -> None:
        self._done += nbytes
        if self._progress is not None:
            self._progress(self._done, self._total)

    def finish(self) -> None:
        if self._async is not None:
            self._async.drain()


def stream_plan(
    plan: MergePlan,
    base: BaseModel,
    adapter: Adapter,
    out_dir: Path,
    progress: Progress | None = None,
    *,
    pipelined: bool = True,
) -> StreamResult:
    """Write every shard of the plan into out_dir; the caller makes out_dir atomic.

    `pipelined` overlaps reading, computing and writing on three threads; without it every step
    runs in turn on the calling thread. Both write the same bytes.
    """
    result = StreamResult()
    metadata = {"format": "pt"}
    # the loop makes no reference cycles; collections triggered by its allocations only cost time
    collecting = gc.isenabled()
    gc.disable()
    try:
        _stream(plan, base, adapter, out_dir, progress, pipelined, result, metadata)
    finally:
        if collecting:
            gc.enable()
    return result


def _stream(
    plan: MergePlan,
    base: BaseModel,
    adapter: Adapter,
    out_dir: Path,
    progress: Progress | None,
    pipelined: bool,
    result: StreamResult,
    metadata: dict[str, str],
) -> None:
    with ExitStack() as stack:
        sources = Sources(base, adapter, stack)
        if pipelined:
            sources.prefetcher = Prefetcher(read_schedule(plan, adapter), sources.read)
            stack.callback(sources.prefetcher.close)
        output = _Output(pipelined, progress, plan.total_bytes)
        try:
            for shard in plan.shards:
                layout = [OutputTensor(t.name, t.dtype, t.shape) for t in shard.tensors]
                writer = StreamingWriter(out_dir / shard.file_name, layout, metadata)
                stack.callback(writer.abandon)
                for tensor in shard.tensors:
                    _write_tensor(tensor, writer, output, sources, adapter, result)
                    output.tensor_finished(tensor.nbytes)
                    result.bytes_written += tensor.nbytes
                output.call(writer.close)
        finally:
            output.finish()


def _write_tensor(
    plan: TensorPlan,
    writer: StreamingWriter,
    output: _Output,
    sources: Sources,
    adapter: Adapter,
    result: StreamResult,
) -> None:
    out_dtype = torch_dtype(plan.dtype)
    if plan.action is Action.COPY:
        reader, name = sources.reader(plan.source or plan.name)
        entry = reader.entry(name)
        output.call(writer.copy_range, reader.fd, reader.absolute_offset(entry), entry.nbytes)
    elif plan.action in (Action.CAST, Action.REPLACE):
        for start, stop in _tiles(plan.shape):
            output.call(writer.write_tensor, sources.rows(plan, start, stop).to(out_dtype))
    elif plan.action is Action.BIAS:
        module = adapter.modules[plan.module or ""]
        base_bias = sources.rows(plan, 0, plan.shape[0]).to(torch.float32)
        assert module.bias is not None
        merged = base_bias + module.bias.float() * module.scale
        output.call(writer.write_tensor, merged.to(out_dtype))
    else:
        _write_merge(plan, writer, output, sources, adapter, result)


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
        # float32(base) + update; converting first is much faster than a mixed-dtype add_
        return base_rows, update.add_(base_rows.to(torch.float32))

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
    output: _Output,
    sources: Sources,
    adapter: Adapter,
    result: StreamResult,
) -> None:
    stats = result.modules.setdefault(plan.module or "", ModuleStats(plan.module or "", plan.name))
    out_dtype = torch_dtype(plan.dtype)
    for base_rows, values in merged_tiles(plan, sources, adapter):
        rounded = values.to(out_dtype)
        before = base_rows if base_rows.dtype == out_dtype else base_rows.to(out_dtype)
        stats.elements += rounded.numel()
        stats.changed += count_changed(rounded, before)
        output.call(writer.write_tensor, rounded)


def count_changed(after: torch.Tensor, before: torch.Tensor) -> int:
    """Elements whose stored bits differ (compared as integers: cheaper than float compares)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(after.element_size())
    if bits is None:
        return int(torch.count_nonzero(after != before))
    # xor is zero exactly where the bits agree, and half the cost of != plus a bool count
    difference = torch.bitwise_xor(after.contiguous().view(bits), before.contiguous().view(bits))
    return int(torch.count_nonzero(difference))
