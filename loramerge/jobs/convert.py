"""`convert`: an adapter rewritten in another format, module names pinned to a base when given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramerge.adapter_checks import check_adapter
from loramerge.formats.registry import read_adapter
from loramerge.jobs.adapter_output import write_adapter
from loramerge.model.fit import rename_to_base


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
) -> dict[str, Any]:
    adapter = read_adapter(source, fmt)
    check_adapter(adapter, allow_nonfinite)
    if base is not None:
        adapter = rename_to_base(adapter, base)
    inputs = [Path(source)] + ([Path(base)] if base is not None else [])
    report: dict[str, Any] = {}
    written = write_adapter(
        adapter, out, to, force=force, inputs=inputs, engine=engine, base=base, report=report
    )
    return {"out": str(written), "format": to, "modules": len(adapter.modules), **report}
