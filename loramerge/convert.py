"""Conversion between adapter formats, with module names pinned to a base model when given."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter
from loramerge.errors import FormatError
from loramerge.formats.registry import read_adapter, write_adapter
from loramerge.model.folder import open_base
from loramerge.model.names import resolve_tensor_name
from loramerge.model.plan import plan_merge
from loramerge.validate import check_adapter


def rename_to_base(adapter: Adapter, base_ref: str | Path) -> Adapter:
    """Module paths replaced by the base model's own names for the same tensors."""
    base = open_base(base_ref)
    names = {entry.name for _, entry in base.tensors()}
    modules = {}
    for module in adapter.modules.values():
        found = resolve_tensor_name(module.path + ".weight", names)
        if found is None:
            raise FormatError(
                f"the base model has no tensor for module {module.path}",
                path=adapter.source_path,
                hint="is this adapter for another base model?",
            )
        path = found.removesuffix(".weight")
        modules[path] = replace(module, path=path)
    renamed = replace(adapter, modules=modules)
    # the same checks a merge makes (shapes, missing tensors): an adapter converted against a
    # base must fit that base
    plan_merge(base.tensors(), base.config, renamed)
    return renamed


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
