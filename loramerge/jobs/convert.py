"""`convert`: an adapter rewritten in another format, module names pinned to a base when given;
ranks optionally reduced (max_rank, energy) with the energy each module keeps reported."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter
from loramerge.adapter_checks import read_checked
from loramerge.formats.provenance import read_as
from loramerge.formats.registry import ReadOptions, check_user_alpha
from loramerge.jobs.adapter_output import check_adapter_output, choose_output, write_adapter
from loramerge.jobs.options import check_rank, check_share
from loramerge.model.fit import rename_to_base
from loramerge.model.folder import base_config_of
from loramerge.ops.lowrank import update_frobenius_norm
from loramerge.ops.rank_truncation import ModuleRow, reduce_svd


def convert_adapter(
    source: str | Path,
    out: str | Path,
    *,
    to: str | None = None,
    engine: str | None = None,
    base: str | Path | None = None,
    fmt: str | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    alpha: float | None = None,
    max_rank: int | None = None,
    energy: float | None = None,
) -> dict[str, Any]:
    """Write the adapter at `source` as `to` (or as the `engine` reads it) at `out`.

    `alpha` is the training lora_alpha of an input that stores none; `max_rank` / `energy`
    reduce ranks (see `reduce_ranks`). Returns `out`, `format`, `modules`, `source_format`,
    `read_as` (what the reader read), `ranks_read`, `full_rank_modules` (modules whose rank is
    as large as their matrix), `reduction` (one row per module, when reduced), and what the
    engine profile reported (see write_adapter)."""
    if max_rank is not None:
        check_rank(max_rank, "max_rank")
    if energy is not None:
        check_share(energy, "energy")
    output = choose_output(to, engine, base, default=None)
    inputs = [Path(source)]
    check_adapter_output(out, output, inputs, force)
    options = ReadOptions(
        alpha=alpha, base_config=base_config_of(base) if base is not None else None, base=base
    )
    adapter = read_checked(source, fmt, options, allow_nonfinite=allow_nonfinite)
    check_user_alpha(adapter, alpha)
    ranks_read = sorted({m.r for m in adapter.modules.values()})
    full_rank = _full_rank_modules(adapter)
    rows: list[ModuleRow] | None = None
    if max_rank is not None or energy is not None:
        adapter, rows = reduce_ranks(adapter, max_rank=max_rank, energy=energy)
    if base is not None:
        adapter = rename_to_base(adapter, base)
    report = write_adapter(adapter, out, output, force=force, inputs=inputs)
    result: dict[str, Any] = {
        "out": str(out),
        "format": output.entry.name,
        "modules": len(adapter.modules),
        "source_format": adapter.source_format,
        "read_as": read_as(adapter),
        "ranks_read": ranks_read,
        "full_rank_modules": full_rank,
        **report,
    }
    if rows is not None:
        result["reduction"] = [asdict(row) for row in rows]
    return result


def reduce_ranks(
    adapter: Adapter, *, max_rank: int | None = None, energy: float | None = None
) -> tuple[Adapter, list[ModuleRow]]:
    """Ranks reduced by the QR-core SVD (ops/rank_truncation.reduce_svd).

    `energy`: every module gets the smallest rank keeping that share of its update's energy,
    capped at `max_rank`. `max_rank` alone: only modules above it are reduced (to it); the rest
    are kept exactly as read, with energy 1.
    """
    if energy is not None:
        return reduce_svd(adapter, energy=energy, max_rank=max_rank)
    assert max_rank is not None
    over = {path: m for path, m in adapter.modules.items() if m.r > max_rank}
    reduced_rows: dict[str, ModuleRow] = {}
    modules = dict(adapter.modules)
    if over:
        reduced, rows = reduce_svd(replace(adapter, modules=over), rank=max_rank)
        modules.update(reduced.modules)
        reduced_rows = {row.module: row for row in rows}
    result_rows = []
    for path, module in adapter.modules.items():
        row = reduced_rows.get(path)
        if row is None:
            lora_b, lora_a = module.factors()
            norm = update_frobenius_norm(lora_b, lora_a, module.scale)
            row = ModuleRow(path, module.r, module.r, 1.0, 0.0, norm, norm)
        result_rows.append(row)
    return replace(adapter, modules=modules), result_rows


def _full_rank_modules(adapter: Adapter) -> list[str]:
    """Modules whose rank is as large as their matrix: their LoRA form saves nothing."""
    found = []
    for path, module in adapter.modules.items():
        fan_in = 1
        for size in module.lora_A.shape[1:]:
            fan_in *= size
        if module.r >= min(module.lora_B.shape[0], fan_in):
            found.append(path)
    return found
