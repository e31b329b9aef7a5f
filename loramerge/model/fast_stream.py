"""The torch-free merge engine: plain LoRA merges into bfloat16 or float32 bases, with numpy,
torch's own BLAS through ctypes, and every core on whole tiles.

It writes the bytes loramerge.model.stream writes (tests/model/test_stream_identity.py holds the
two to the same bytes; loramerge.model.fast_checks confirms the arithmetic on each machine), but
needs no torch import (1.2-1.6 s on the benchmark machine), so a merge reads and writes from its
first fraction of a second, and it computes tiles in parallel: each worker thread takes the next
tile, widens it, adds the update with one single-threaded product (all cores on products when
they dominate, as with a large rank), rounds it straight into the output chunk it belongs to
(io.chunked_output) and counts what rounding kept. Reader threads keep tiles coming in order.
Plans with anything else (DoRA, biases, replaced or cast tensors, transposed or stacked layouts,
float16) take the torch engine.
"""

from __future__ import annotations

import gc
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy

from loramerge.io.chunked_output import ArrayPool, ChunkedFiles, ShardFile
from loramerge.io.direct_io import BLOCK, direct_writes_work
from loramerge.io.safetensors_header import itemsize
from loramerge.io.safetensors_reader import SafetensorsReader
from loramerge.io.safetensors_writer import OutputTensor, encode_header
from loramerge.model.folder import BaseModel
from loramerge.model.pipeline import Prefetcher
from loramerge.model.plan import Action, MergePlan, TensorPlan
from loramerge.model.stream_stats import ModuleStats, Progress, StreamResult
from loramerge.model.tiling import tiles
from loramerge.ops import bits, torch_blas
from loramerge.ops.fast_update import SPARE, Scratch, add_update, prescaled_factors
from loramerge.ops.stored_factors import float32_matrix

COPY_PIECE = 4 << 20  # untouched tensors are moved in pieces of at most this many bytes
METADATA = {"format": "pt"}


@dataclass(frozen=True)
class _Item:
    """A run of output bytes: a file's header, a piece of an untouched tensor (bytes start:stop)
    or a tile of a merged one (rows start:stop)."""

    file: int
    offset: int
    nbytes: int
    tensor: TensorPlan | None = None
    start: int = 0
    stop: int = 0

    @property
    def merged(self) -> bool:
        return self.tensor is not None and self.tensor.action is Action.MERGE


def _layout(plan: MergePlan) -> tuple[list[bytes], list[_Item]]:
    """Each file's header, and every item in the order of the files."""
    headers, items = [], []
    for file, shard in enumerate(plan.shards):
        layout = [OutputTensor(t.name, t.dtype, t.shape) for t in shard.tensors]
        headers.append(encode_header(layout, METADATA))
        items.append(_Item(file, 0, len(headers[-1])))
        offset = len(headers[-1])
        for tensor in shard.tensors:
            if tensor.action is Action.MERGE:
                row_bytes = tensor.nbytes // max(1, tensor.shape[0])
                for start, stop in tiles(tensor.tile_shape):
                    at = offset + start * row_bytes
                    items.append(_Item(file, at, (stop - start) * row_bytes, tensor, start, stop))
            else:
                for start in range(0, tensor.nbytes, COPY_PIECE):
                    stop = min(tensor.nbytes, start + COPY_PIECE)
                    items.append(_Item(file, offset + start, stop - start, tensor, start, stop))
            offset += tensor.nbytes
    return headers, items


class _Engine:
    """One run: readers and prefetching of the base, the workers, the output chunks."""

    def __init__(self, plan: MergePlan, base: BaseModel, out_dir: Path, files: ChunkedFiles):
        self.plan, self.base, self.files = plan, base, files
        self.blas = torch_blas.load()
        self.direct = files.files[0].direct if files.files else False
        self.headers, self.items = _layout(plan)
        largest = max((i.nbytes for i in self.items if i.tensor is not None), default=1)
        self.pool = ArrayPool(largest + 2 * BLOCK)
        self.located = base.locate()
        self.readers: dict[str, SafetensorsReader] = {}
        self.result = StreamResult(bytes_written=plan.total_bytes)
        for item in self.items:  # in plan order, as the torch engine reports them
            if item.merged and item.tensor.module not in self.result.modules:
                self.result.modules[item.tensor.module] = ModuleStats(
                    item.tensor.module, item.tensor.name
                )
        self.remaining: dict[str, int] = {}
        for item in self.items:
            if item.merged:
                self.remaining[item.tensor.module] = self.remaining.get(item.tensor.module, 0) + 1
        self.held: dict[str, tuple] = {}
        self.lock = threading.Lock()  # readers, factors, stats
        self.order = threading.Lock()  # the next item
        self.next = 0
        self.error: BaseException | None = None
        self.prefetcher = Prefetcher(range(len(self.items)), self._read)

    def _reader(self, name: str) -> tuple[SafetensorsReader, int, int]:
        shard, entry = self.located[name]
        with self.lock:
            if shard not in self.readers:
                self.readers[shard] = SafetensorsReader(
                    self.base.shard_path(shard), direct=self.direct, allocate=self.pool.take
                )
            reader = self.readers[shard]
        row_bytes = entry.nbytes // max(1, entry.shape[0]) if entry.shape else entry.nbytes
        return reader, reader.absolute_offset(reader.entry(name)), row_bytes

    def _read(self, index: int) -> numpy.ndarray:
        item = self.items[index]
        if item.tensor is None:
            return numpy.frombuffer(self.headers[item.file], dtype=numpy.uint8)
        reader, offset, row_bytes = self._reader(item.tensor.source or item.tensor.name)
        if item.merged:
            return reader.read_bytes(offset + item.start * row_bytes, item.nbytes)
        return reader.read_bytes(offset + item.start, item.nbytes)

    def work(self) -> None:
        """A worker: takes items in order until none is left (or one has failed)."""
        if self.blas is not None:
            self.blas.set_threads(1)  # one core per tile: the workers share the cores
        scratch = Scratch()
        try:
            while True:
                with self.order:
                    if self.error is not None or self.next >= len(self.items):
                        return
                    index, self.next = self.next, self.next + 1
                    stored = self.prefetcher.take(index)
                self._do(self.items[index], stored, scratch)
        except BaseException as exc:
            with self.order:
                self.error = self.error or exc
            self.files.fail(exc)

    def _do(self, item: _Item, stored: numpy.ndarray, scratch: Scratch) -> None:
        try:
            if item.merged:
                self._merge(item, stored, scratch)
            else:
                self._emit(item, stored)
        finally:
            if item.tensor is not None:
                self.pool.give(stored)

    def _emit(self, item: _Item, data: numpy.ndarray) -> None:
        """Bytes as they are (a header, a piece of an untouched tensor)."""
        for piece in self.files.pieces(item.file, item.offset, item.nbytes):
            target = self.files.buffer(piece.chunk)[piece.start : piece.start + piece.length]
            numpy.copyto(target, data[piece.source : piece.source + piece.length])
            self.files.filled(piece.chunk, piece.length)

    def _merge(self, item: _Item, stored: numpy.ndarray, scratch: Scratch) -> None:
        tensor = item.tensor
        assert tensor is not None and tensor.module is not None
        code, columns = tensor.dtype, tensor.shape[1]
        rows = item.stop - item.start
        wide = scratch.get("wide", rows * columns, numpy.float32).reshape(rows, columns)
        bits.widen_into(stored, code, wide)
        assert self.blas is not None
        add_update(self.blas, wide, self._factors(tensor.module), item.start, item.stop, scratch)
        changed = self._emit_rounded(item, wide.reshape(-1), stored, scratch)
        with self.lock:
            stats = self.result.modules[tensor.module]
            stats.elements += wide.size
            stats.changed += changed
            self.remaining[tensor.module] -= 1
            if not self.remaining[tensor.module]:
                self.held.pop(tensor.module, None)  # its last tile is done

    def _emit_rounded(
        self, item: _Item, values: numpy.ndarray, stored: numpy.ndarray, scratch: Scratch
    ) -> int:
        """Round into the output chunks; the number of elements rounding changed."""
        code = item.tensor.dtype
        size = itemsize(code)
        view = numpy.uint16 if size == 2 else numpy.uint32
        before = stored.view(view)
        if item.offset % size:  # a tensor at an odd offset: round aside, then copy bytes
            rounded = scratch.get("rounded", item.nbytes, numpy.uint8)
            spare = scratch.get(SPARE, values.size, numpy.uint32)
            bits.round_into(values, code, rounded.view(view), spare)
            self._emit(item, rounded)
            return bits.count_changed(rounded.view(view), before)
        changed = 0
        for piece in self.files.pieces(item.file, item.offset, item.nbytes):
            low, high = piece.source // size, (piece.source + piece.length) // size
            chunk = self.files.buffer(piece.chunk)
            target = chunk[piece.start : piece.start + piece.length].view(view)
            spare = scratch.get(SPARE, high - low, numpy.uint32)
            bits.round_into(values[low:high], code, target, spare)
            changed += bits.count_changed(target, before[low:high])
            self.files.filled(piece.chunk, piece.length)
        return changed

    def _factors(self, key: str) -> tuple[numpy.ndarray, numpy.ndarray, float]:
        """The module's (B, A, s) as float32 matrices, read once and held while its tiles are
        merged."""
        with self.lock:
            found = self.held.get(key)
            if found is None:
                module = self.plan.adapter.modules[key]
                lora_b, lora_a = float32_matrix(module.lora_B), float32_matrix(module.lora_A)
                found = prescaled_factors(lora_b, lora_a, module.scale)
                self.held[key] = found
            return found

    def close(self) -> None:
        self.prefetcher.close()
        for reader in self.readers.values():
            reader.close()


def stream_fast(
    plan: MergePlan, base: BaseModel, out_dir: Path, progress: Progress | None = None
) -> StreamResult:
    """Write every shard of the plan into out_dir (which the caller makes atomic), as
    loramerge.model.stream.stream_plan does; `unsupported(plan, base)` must be None."""
    direct = direct_writes_work(out_dir)
    headers, _ = _layout(plan)
    sizes = [len(h) + shard.nbytes for h, shard in zip(headers, plan.shards, strict=True)]
    total = sum(sizes)

    def written(done: int) -> None:
        if progress is not None:
            progress(done, total)

    files: list[ShardFile] = []
    collecting = gc.isenabled()
    gc.disable()  # the loop makes no reference cycles
    try:
        for shard, size in zip(plan.shards, sizes, strict=True):
            files.append(ShardFile(out_dir / shard.file_name, size, direct))
        output = ChunkedFiles(files, on_written=written)
        engine = _Engine(plan, base, out_dir, output)
        try:
            _run_workers(engine)
            output.finish()
        except BaseException:
            output.abandon()
            raise
        finally:
            engine.close()
        return engine.result
    finally:
        for found in files:
            found.close()
        if collecting:
            gc.enable()


def _run_workers(engine: _Engine) -> None:
    workers = [
        threading.Thread(target=engine.work, name=f"loramerge-merge-{n}", daemon=True)
        for n in range(max(1, os.cpu_count() or 1))
    ]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            while worker.is_alive():
                worker.join(0.2)  # in steps, so that Ctrl-C reaches this thread
    except BaseException as exc:
        with engine.order:
            engine.error = engine.error or exc
        engine.files.fail(exc)
        for worker in workers:
            worker.join()
        raise
    if engine.error is not None:
        raise engine.error
