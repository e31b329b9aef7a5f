"""The base weights as ResLoRA's weight-based norms need them (docs/rules.md section 4): read
in row tiles, widened to float64, reduced to ||W||_F^2, B^T W and (official norms) W B."""

from __future__ import annotations

from contextlib import ExitStack

import torch

from loramerge.io.safetensors_header import TensorEntry
from loramerge.io.safetensors_reader import SafetensorsReader
from loramerge.model.folder import BaseModel
from loramerge.model.stream_stats import Progress
from loramerge.ops.reslora_rules import BaseProducts

# float64 bytes of base rows read at a time for the norms: a tile, its squares and the
# products stay within the last-level cache (32 MiB tiles took twice the CPU time)
TILE_BYTES = 8 << 20


class BaseWeights:
    """Base weights read in row tiles for the weight-based norms, one reader per shard."""

    def __init__(
        self, base: BaseModel, stack: ExitStack, paths: list[str], progress: Progress | None
    ) -> None:
        """A reader of the weights of the modules at `paths`, reporting to `progress`."""
        self.base = base
        self.stack = stack
        self.located: dict[str, tuple[str, TensorEntry]] = base.locate()
        self.readers: dict[str, SafetensorsReader] = {}
        self.progress = progress
        self.done = 0
        self.total = sum(self.located[f"{path}.weight"][1].nbytes for path in paths)

    def products(self, path: str, B: torch.Tensor, official: bool) -> BaseProducts:
        """||W||_F^2, B^T W and (official) W B for the base weight at `path`."""
        name = f"{path}.weight"
        shard, entry = self.located[name]
        if shard not in self.readers:
            reader = SafetensorsReader(self.base.shard_path(shard))
            self.readers[shard] = self.stack.enter_context(reader)
        reader = self.readers[shard]
        rows, cols = entry.shape
        tile = max(1, TILE_BYTES // (8 * cols))
        norm_sq = 0.0
        bt_w = torch.zeros(B.shape[1], cols, dtype=torch.float64)
        w_b = torch.zeros(rows, B.shape[1], dtype=torch.float64) if official else None
        widened = torch.empty(min(tile, rows), cols, dtype=torch.float64)
        squares = torch.empty_like(widened)
        for start in range(0, rows, tile):
            stop = min(rows, start + tile)
            w = widened[: stop - start]
            w.copy_(reader.read(name, rows=(start, stop)))
            norm_sq += float(torch.mul(w, w, out=squares[: stop - start]).sum())
            bt_w += B[start:stop].T @ w
            self.done += (stop - start) * entry.row_bytes
            if self.progress is not None:
                self.progress(self.done, self.total)
            if w_b is not None:
                w_b[start:stop] = w @ B
        return BaseProducts(norm_sq, bt_w, w_b)
