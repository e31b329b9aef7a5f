"""`verify` of a merged model folder against the adapter and base it was merged from, weight by
weight, streamed: every tensor a merge writes is computed tile by tile as `merge` computes it
(float32, before rounding) and compared with what the folder stores.

A stored value that differs from the reference by at most one unit in the last place of its own
dtype is taken as rounding (one rounding, or two as in a merge made in bfloat16 arithmetic);
only the part of each difference beyond that counts. Per module (per tensor where no module
changes it): the Frobenius norm of that excess must be <= atol + rtol x the norm of what the
merge changes in the weight (its update); an untouched tensor must hold the base's values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import Adapter
from loramerge.adapter_checks import read_checked
from loramerge.errors import MismatchError
from loramerge.formats.registry import ReadOptions
from loramerge.io.safetensors_header import TensorEntry, torch_dtype
from loramerge.io.safetensors_reader import SafetensorsReader
from loramerge.jobs.merge import planned_merge
from loramerge.jobs.verify_result import Difference, VerifyResult, is_model_folder
from loramerge.model.folder import open_base
from loramerge.model.plan import Action, TensorPlan
from loramerge.model.reference_tiles import reference_tiles
from loramerge.model.sources import Sources, sources_for
from loramerge.model.stream_stats import Progress

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_BITS[torch.float64] = torch.int64


def spacing(stored: torch.Tensor) -> torch.Tensor:
    """The gap above each value's magnitude in its own dtype (float64); 0 for integers, NaN for
    NaN and infinity (which must then match exactly)."""
    bits = _BITS.get(stored.dtype)
    if bits is None:
        return torch.zeros(stored.shape, dtype=torch.float64)
    magnitude = stored.abs()
    above = (magnitude.view(bits) + 1).view(stored.dtype)
    gap = above.to(torch.float64) - magnitude.to(torch.float64)
    return torch.where(torch.isfinite(stored), gap, torch.nan)


def excess_squares(stored: torch.Tensor, reference: torch.Tensor) -> float:
    """Sum of squares of |stored - reference| beyond one unit in the last place of `stored`."""
    values = stored.to(torch.float64)
    wanted = reference.to(torch.float64)
    gap = spacing(stored)
    beyond = ((values - wanted).abs() - gap).clamp(min=0)
    special = ~torch.isfinite(gap)  # NaN and infinity: equal or not at all
    same = (values == wanted) | (values.isnan() & wanted.isnan())
    beyond = torch.where(special, torch.where(same, 0.0, math.inf), beyond)
    return float(beyond.square().sum())


class _Sums:
    def __init__(self) -> None:
        self.update = 0.0  # squares of what the merge changes
        self.excess = 0.0  # squares of the candidate's differences beyond rounding


def compare_merged(
    adapter: Adapter, base_ref: str | Path, candidate: Path, progress: Progress | None = None
) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Per module (or untouched tensor): (norm of the update, norm of the excess), and notes."""
    plan, base = planned_merge(adapter, base_ref)
    adapter = plan.adapter
    folder = open_base(candidate)
    stored = folder.locate()
    planned = [tensor for shard in plan.shards for tensor in shard.tensors]
    total, done = sum(t.nbytes for t in planned), 0
    sums: dict[str, _Sums] = {}
    with ExitStack() as stack:
        sources = sources_for(plan, base, stack)
        readers: dict[str, SafetensorsReader] = {}
        for tensor in planned:
            shard, entry = _candidate_entry(stored, tensor, candidate)
            if shard not in readers:
                readers[shard] = stack.enter_context(SafetensorsReader(folder.shard_path(shard)))
            found = sums.setdefault(tensor.module or tensor.name, _Sums())
            _compare_tensor(tensor, sources, adapter, readers[shard], entry, found)
            done += tensor.nbytes
            if progress is not None:
                progress(done, total)
    extra = sorted(set(stored) - {t.name for t in planned})
    notes = [f"{candidate} holds {len(extra)} tensors a merge does not write, not compared "
             f"(e.g. {extra[0]})"] if extra else []  # fmt: skip
    return {key: (math.sqrt(s.update), math.sqrt(s.excess)) for key, s in sums.items()}, notes


def _candidate_entry(
    stored: dict[str, tuple[str, TensorEntry]], tensor: TensorPlan, candidate: Path
) -> tuple[str, TensorEntry]:
    found = stored.get(tensor.name)
    if found is None:
        raise MismatchError(
            f"lacks {tensor.name}, which merging the adapter into the base writes",
            file=candidate,
            module=tensor.module,
        )
    if tuple(found[1].shape) != tuple(tensor.shape):
        raise MismatchError(
            f"{tensor.name} has shape {list(found[1].shape)} where the merge writes "
            f"{list(tensor.shape)}",
            file=candidate,
            module=tensor.module,
        )
    return found


def _compare_tensor(
    tensor: TensorPlan,
    sources: Sources,
    adapter: Adapter,
    reader: SafetensorsReader,
    entry: TensorEntry,
    sums: _Sums,
) -> None:
    dtype = torch_dtype(entry.dtype)
    row_bytes = entry.nbytes // max(1, entry.shape[0]) if entry.shape else entry.nbytes
    changes = tensor.action is not Action.COPY and tensor.action is not Action.CAST
    for tile in reference_tiles(tensor, sources, adapter):
        if not tile.values.numel():
            continue
        offset = reader.absolute_offset(entry) + tile.start * row_bytes
        raw = reader.read_bytes(offset, (tile.stop - tile.start) * row_bytes)
        candidate = torch.as_tensor(raw).view(dtype).reshape(tile.values.shape)
        sums.excess += _tile_excess(candidate, tile.values)
        if changes:
            moved = tile.values.to(torch.float32)
            if tile.base is not None:
                moved = moved - tile.base.to(torch.float32).reshape(moved.shape)
            sums.update += float(torch.linalg.vector_norm(moved, dtype=torch.float64)) ** 2


def _tile_excess(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """excess_squares, computed only where the candidate's bits are not the reference rounded
    once to the candidate's dtype (everywhere else the difference is within half a unit)."""
    rounded = reference.to(candidate.dtype)
    bits = _BITS.get(candidate.dtype)
    if bits is None:
        differ = (candidate != rounded).reshape(-1)
    else:
        differ = (candidate.view(bits) != rounded.view(bits)).reshape(-1)
    if not bool(differ.any()):
        return 0.0
    return excess_squares(candidate.reshape(-1)[differ], reference.reshape(-1)[differ])


def compare_weights(
    source: Path,
    candidate: Path,
    base: str | Path,
    base_config: Mapping[str, Any] | None,
    atol: float,
    rtol: float,
    progress: Progress | None,
) -> VerifyResult:
    """An adapter and a merged model folder (on either side), weight by weight."""
    adapter_side, folder = (candidate, source) if is_model_folder(source) else (source, candidate)
    adapter = read_checked(adapter_side, options=ReadOptions(base_config=base_config, base=base))
    norms, notes = compare_merged(adapter, base, folder, progress)
    result = VerifyResult("weights", atol, rtol, notes=notes)
    for name, (update, excess) in norms.items():
        result.differences.append(Difference(name, update, excess))
    return result
