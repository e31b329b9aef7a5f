"""Fitting an adapter to a base model: module paths pinned to the base's own tensor names and
checked the way a merge checks them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from loramerge.adapter import Adapter
from loramerge.errors import FormatError
from loramerge.model.folder import open_base
from loramerge.model.names import resolve_tensor_name
from loramerge.model.plan import plan_merge


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
