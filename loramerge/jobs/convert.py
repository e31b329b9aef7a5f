"""`convert`: an adapter rewritten in another format, module names pinned to a base when given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramerge.adapter_checks import check_adapter
from loramerge.formats.components import for_component
from loramerge.formats.registry import read_adapter
from loramerge.jobs.adapter_output import write_adapter
from loramerge.jobs.pipeline_base import fit_components, fold_lycoris_dora, refuse_merge_only


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
    component: str | None = None,
) -> dict[str, Any]:
    """Read SOURCE and write it as `to` at OUT. `component` picks one model of a pipeline
    adapter (or says which model a one-model adapter is for, as diffusers files need)."""
    adapter = read_adapter(source, fmt)
    check_adapter(adapter, allow_nonfinite)
    adapter = for_component(adapter, component)
    refuse_merge_only(adapter)
    if base is not None:
        adapter = fit_components(adapter, base)
    adapter = fold_lycoris_dora(adapter, base, "converting it")
    inputs = [Path(source)] + ([Path(base)] if base is not None else [])
    report: dict[str, Any] = {}
    written = write_adapter(
        adapter, out, to, force=force, inputs=inputs, engine=engine, base=base, report=report
    )
    return {"out": str(written), "format": to, "modules": len(adapter.modules), **report}
