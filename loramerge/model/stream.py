"""The merge executor: streams a plan tensor by tensor, in row tiles, through the writer; the
merged values of a tile come from loramerge.model.merged_tiles."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy
import torch

from loramerge.adapter import Adapter
from loramerge.io.direct_io import direct_writes_work
from loramerge.io.safetensors_header import torch_dtype
from loramerge.io.safetensors_writer import OutputTensor, StreamingWriter
from loramerge.model.dense_tiles import dense_support
from loramerge.model.folder import BaseModel
from loramerge.model.merged_tiles import merged_bias, merged_tiles
from loramerge.model.pipeline import AsyncWriter, Prefetcher
from loramerge.model.plan import Action, MergePlan, TensorPlan
from loramerge.model.sources import Sources, read_schedule, sources_for
from loramerge.model.stream_stats import (  # noqa: F401 - ERASED_SHARE: callers' import
    ERASED_SHARE,
    ModuleStats,
    Progress,
    StreamResult,
)
from loramerge.model.tiling import tiles


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
    out_dir: Path,
    progress: Progress | None = None,
    *,
    pipelined: bool = True,
    direct: bool = True,
) -> StreamResult:
    """Write every shard of the plan into out_dir; the caller makes out_dir atomic.

    `pipelined` overlaps reading, computing and writing on reader, computing and writer threads
    (see model/pipeline.py); without it every step runs in turn on the calling thread. `direct`
    reads and writes with O_DIRECT where the file systems allow it (see direct_io); untouched
    tensors then pass through memory instead of a kernel-side copy. Every combination writes
    the same bytes.
    """
    result = StreamResult()
    metadata = {"format": "pt"}
    # the loop makes no reference cycles; collections triggered by its allocations only cost time
    collecting = gc.isenabled()
    gc.disable()
    threads = torch.get_num_threads()
    if pipelined:
        # the preparing and writing threads keep about two cores busy with conversions;
        # more arithmetic threads than the cores left over only wait for each other
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - 2)))
    try:
        direct = direct and direct_writes_work(out_dir)
        _stream(plan, base, out_dir, progress, pipelined, direct, result, metadata)
    finally:
        torch.set_num_threads(threads)
        if collecting:
            gc.enable()
    return result


def _stream(
    plan: MergePlan,
    base: BaseModel,
    out_dir: Path,
    progress: Progress | None,
    pipelined: bool,
    direct: bool,
    result: StreamResult,
    metadata: dict[str, str],
) -> None:
    adapter = plan.adapter
    with ExitStack() as stack:
        sources = sources_for(plan, base, stack, direct)
        if pipelined:
            schedule = read_schedule(plan, adapter, copies_read=direct)
            sources.prefetcher = Prefetcher(schedule, sources.read, sources.prepare)
            stack.callback(sources.prefetcher.close)
        output = _Output(pipelined, progress, plan.total_bytes)
        try:
            for shard in plan.shards:
                layout = [OutputTensor(t.name, t.dtype, t.shape) for t in shard.tensors]
                writer = StreamingWriter(out_dir / shard.file_name, layout, metadata, direct=direct)
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
    if plan.action is Action.COPY and not sources.direct:
        reader, name = sources.reader(plan.source or plan.name)
        entry = reader.entry(name)
        output.call(writer.copy_range, reader.fd, reader.absolute_offset(entry), entry.nbytes)
    elif plan.action in (Action.COPY, Action.CAST, Action.REPLACE):
        # a copy through memory: `to` returns the very tensor when the dtype is unchanged
        for start, stop in tiles(plan.tile_shape):
            rows = sources.rows(plan, start, stop)
            output.call(_write_rows, writer, sources, rows, out_dtype)
    elif plan.action is Action.ROWS:
        for start, stop in tiles(plan.tile_shape):
            stored = sources.rows(plan, start, stop)
            values = stored.to(out_dtype)  # the very tile when the dtype is unchanged
            sources.write_token_rows(plan, values, start, stop)
            output.call(_write_rows, writer, sources, values, out_dtype)
    elif plan.action is Action.BIAS:
        stored = sources.rows(plan, 0, plan.shape[0])
        merged = merged_bias(plan, stored, adapter)
        sources.give(stored)  # only now: `to` returns the very tensor when it is float32
        output.call(writer.write_tensor, merged.to(out_dtype))
    else:
        _write_merge(plan, writer, output, sources, adapter, result)


def _write_rows(
    writer: StreamingWriter, sources: Sources, rows: torch.Tensor, out_dtype: torch.dtype
) -> None:
    writer.write_tensor(rows.to(out_dtype))
    sources.give(rows)


def _write_merge(
    plan: TensorPlan,
    writer: StreamingWriter,
    output: _Output,
    sources: Sources,
    adapter: Adapter,
    result: StreamResult,
) -> None:
    stats = result.modules.setdefault(plan.module or "", ModuleStats(plan.module or "", plan.name))
    if plan.dense:
        stats.support = dense_support(plan, adapter)
    out_dtype = torch_dtype(plan.dtype)
    for base_rows, values in merged_tiles(plan, sources, adapter):
        output.call(_write_rounded, writer, sources, values, base_rows, out_dtype, stats)


def _write_rounded(
    writer: StreamingWriter,
    sources: Sources,
    values: torch.Tensor,
    base_rows: torch.Tensor,
    out_dtype: torch.dtype,
    stats: ModuleStats,
) -> None:
    """Round and write one merged tile, then count what rounding kept of the update (on the
    writer's thread, which has the rounded bytes at hand)."""
    rounded = writer.write_rounded(values, out_dtype)
    before = base_rows if base_rows.dtype == out_dtype else base_rows.to(out_dtype)
    stats.elements += rounded.numel()
    stats.changed += count_changed(rounded, before.reshape(-1))
    sources.give(base_rows, values)


def count_changed(after: torch.Tensor, before: torch.Tensor) -> int:
    """Elements whose stored bits differ (compared as integers: cheaper than float compares,
    and NaN equals itself when its bits do)."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[after.element_size()]
    # numpy's compare and count are about twice as fast as torch's here, and release the GIL
    after_bits = after.contiguous().view(bits).numpy()
    before_bits = before.contiguous().view(bits).numpy()
    return int(numpy.count_nonzero(after_bits != before_bits))
