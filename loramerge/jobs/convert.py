"""`convert`: an adapter rewritten in another format, module names pinned to a base when given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramerge.adapter_checks import read_checked
from loramerge.formats.registry import ReadOptions
from loramerge.jobs.adapter_output import check_adapter_output, choose_output, write_adapter
from loramerge.model.fit import rename_to_base
from loramerge.model.folder import base_config_of


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
) -> dict[str, Any]:
    """Write the adapter at `source` as `to` (or as the `engine` reads it) at `out`.

    Returns `out`, `format`, `modules`, and what the engine profile reported (see
    write_adapter)."""
    output = choose_output(to, engine, base, default=None)
    inputs = [Path(source)]
    check_adapter_output(out, output, inputs, force)
    options = ReadOptions(base_config=base_config_of(base) if base is not None else None)
    adapter = read_checked(source, fmt, options, allow_nonfinite=allow_nonfinite)
    if base is not None:
        adapter = rename_to_base(adapter, base)
    report = write_adapter(adapter, out, output, force=force, inputs=inputs)
    return {"out": str(out), "format": output.entry.name, "modules": len(adapter.modules), **report}
