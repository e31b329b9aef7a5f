"""`convert`: an adapter rewritten in another format, module names pinned to a base when given;
ranks optionally reduced (--max-rank, --energy) with the energy each module keeps reported."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter
from loramerge.adapter_checks import check_adapter
from loramerge.errors import OptionError
from loramerge.formats.provenance import read_as
from loramerge.formats.registry import ReadOptions, check_user_alpha, read_adapter
from loramerge.jobs.adapter_output import write_adapter
from loramerge.model.fit import rename_to_base
from loramerge.ops.lowrank import update_frobenius_norm
from loramerge.ops.rank_truncation import ModuleRow, reduce_svd


def convert_adapter(
    source: str | Path,
    to: str,
    out: str | Path,
    *,
    base: str | Path | None = None,
    fmt: str | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    engine: str | None = None,
    alpha: float | None = None,
    max_rank: int | None = None,
    energy: float | None = None,
) -> dict[str, Any]:
    _check_reduction(max_rank, energy)
    adapter = read_adapter(source, fmt, ReadOptions(alpha=alpha, base=base))
    check_user_alpha(adapter, alpha, source)
    check_adapter(adapter, allow_nonfinite)
    ranks_read = sorted({m.r for m in adapter.modules.values()})
    full_rank = _full_rank_modules(adapter)
    rows: list[ModuleRow] | None = None
    if max_rank is not None or energy is not None:
        adapter, rows = reduce_ranks(adapter, max_rank=max_rank, energy=energy)
    if base is not None:
        adapter = rename_to_base(adapter, base)
    inputs = [Path(source)] + ([Path(base)] if base is not None else [])
    report: dict[str, Any] = {}
    written = write_adapter(
        adapter, out, to, force=force, inputs=inputs, engine=engine, base=base, report=report
    )
    result: dict[str, Any] = {
        "out": str(written),
        "format": to,
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


def _check_reduction(max_rank: int | None, energy: float | None) -> None:
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1
    ):
        raise OptionError(f"--max-rank must be a whole number >= 1, got {max_rank!r}")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1
    ):
        raise OptionError(f"--energy must be a number in (0, 1], got {energy!r}")


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
