"""`convert`: an adapter rewritten in another format, module names pinned to a base when given;
ranks optionally reduced (max_rank, energy) with the energy each module keeps reported."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter
from loramerge.adapter_checks import read_checked, refuse_dense_updates
from loramerge.formats.components import for_component
from loramerge.formats.derived_factors import merge_only_reason
from loramerge.formats.provenance import read_as
from loramerge.formats.registry import ReadOptions
from loramerge.jobs.adapter_output import check_adapter_output, choose_output, write_adapter
from loramerge.jobs.options import check_rank, check_share
from loramerge.jobs.pipeline_base import (
    fit_components,
    fold_lycoris_dora,
    model_config,
    refuse_merge_only,
)
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
    component: str | None = None,
    alpha: float | None = None,
    max_rank: int | None = None,
    energy: float | None = None,
) -> dict[str, Any]:
    """Write the adapter at `source` as `to` (or as the `engine` reads it) at `out`.

    `component` picks one model of a pipeline adapter (kohya, LyCORIS, diffusers), or says
    which model a one-model adapter is for (diffusers files name it). `alpha` is the training
    lora_alpha of an input that stores none. `max_rank` / `energy` reduce ranks (see
    `reduce_ranks`); without them, modules with no low-rank form (see formats/derived_factors)
    are refused. Returns `out`, `format`, `modules`, `source_format`, `read_as` (what the reader
    read), `ranks_read`, `reduction` (one row per module, when reduced), and what the engine
    profile reported (see write_adapter)."""
    if max_rank is not None:
        check_rank(max_rank, "max_rank")
    if energy is not None:
        check_share(energy, "energy")
    config = model_config(base) if base is not None else None
    # a pipeline folder has no config of its own for engine profiles and GGUF to read
    output = choose_output(to, engine, base if config is not None else None, default=None)
    inputs = [Path(source)] + ([Path(base)] if base is not None and config is None else [])
    check_adapter_output(out, output, inputs, force)
    options = ReadOptions(alpha=alpha, base_config=config, base=base)
    adapter = read_checked(source, fmt, options, allow_nonfinite=allow_nonfinite)
    refuse_dense_updates(adapter, "an adapter file")
    adapter = for_component(adapter, component)
    result: dict[str, Any] = {
        "source_format": adapter.source_format,
        "read_as": read_as(adapter),
        "ranks_read": sorted({m.r for m in adapter.modules.values()}),
    }
    if max_rank is not None or energy is not None:
        adapter, rows = reduce_ranks(adapter, max_rank=max_rank, energy=energy)
        result["reduction"] = [asdict(row) for row in rows]
    refuse_merge_only(adapter)
    if base is not None:
        adapter = fit_components(adapter, base)
    adapter = fold_lycoris_dora(adapter, base, "converting it")
    report = write_adapter(adapter, out, output, force=force, inputs=inputs)
    return {
        "out": str(out),
        "format": output.entry.name,
        "modules": len(adapter.modules),
        **result,
        **report,
    }


def reduce_ranks(
    adapter: Adapter, *, max_rank: int | None = None, energy: float | None = None
) -> tuple[Adapter, list[ModuleRow]]:
    """Ranks reduced by the QR-core SVD (ops/rank_truncation.reduce_svd).

    `energy`: every module gets the smallest rank keeping that share of its update's energy,
    capped at `max_rank`. `max_rank` alone: modules above it are reduced to it, and so are
    forms with no low-rank form (refactored at their rank when it is below the cap); the rest
    are kept exactly as read, with energy 1.
    """
    if energy is not None:
        return reduce_svd(adapter, energy=energy, max_rank=max_rank)
    assert max_rank is not None
    over = {
        key: m
        for key, m in adapter.modules.items()
        if m.r > max_rank or merge_only_reason(m) is not None
    }
    reduced_rows: dict[str, ModuleRow] = {}
    modules = dict(adapter.modules)
    if over:
        reduced, rows = reduce_svd(replace(adapter, modules=over), rank=max_rank)
        modules.update(reduced.modules)
        reduced_rows = dict(zip(over, rows, strict=True))
    result_rows = []
    for key, module in adapter.modules.items():
        row = reduced_rows.get(key)
        if row is None:
            lora_b, lora_a = module.factors()
            norm = update_frobenius_norm(lora_b, lora_a, module.scale)
            row = ModuleRow(key, module.r, module.r, 1.0, 0.0, norm, norm)
        result_rows.append(row)
    return replace(adapter, modules=modules), result_rows
