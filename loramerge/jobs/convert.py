"""`convert`: an adapter rewritten in another format, module names pinned to a base when given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramerge.adapter_checks import read_checked
from loramerge.formats.components import for_component
from loramerge.formats.registry import ReadOptions
from loramerge.jobs.adapter_output import check_adapter_output, choose_output, write_adapter
from loramerge.jobs.pipeline_base import (
    fit_components,
    fold_lycoris_dora,
    model_config,
    refuse_merge_only,
)


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
) -> dict[str, Any]:
    """Write the adapter at `source` as `to` (or as the `engine` reads it) at `out`.

    `component` picks one model of a pipeline adapter (kohya, LyCORIS, diffusers), or says
    which model a one-model adapter is for (diffusers files name it). Modules with no low-rank
    form (see formats/derived_factors) are refused. Returns `out`, `format`, `modules`, and
    what the engine profile reported (see write_adapter)."""
    config = model_config(base) if base is not None else None
    # a pipeline folder has no config of its own for engine profiles and GGUF to read
    output = choose_output(to, engine, base if config is not None else None, default=None)
    inputs = [Path(source)] + ([Path(base)] if base is not None and config is None else [])
    check_adapter_output(out, output, inputs, force)
    options = ReadOptions(base_config=config)
    adapter = read_checked(source, fmt, options, allow_nonfinite=allow_nonfinite)
    adapter = for_component(adapter, component)
    refuse_merge_only(adapter)
    if base is not None:
        adapter = fit_components(adapter, base)
    adapter = fold_lycoris_dora(adapter, base, "converting it")
    report = write_adapter(adapter, out, output, force=force, inputs=inputs)
    return {"out": str(out), "format": output.entry.name, "modules": len(adapter.modules), **report}
