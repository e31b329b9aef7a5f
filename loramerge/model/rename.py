"""An adapter renamed to its base: module paths as the base names them, kinds resolved, and
every full tensor it carries checked against the base's parameter."""

from __future__ import annotations

from pathlib import Path

from loramerge.adapter import Adapter
from loramerge.errors import FormatError
from loramerge.model.fit import fit_adapter
from loramerge.model.folder import open_base
from loramerge.model.shapes import check_full_copy


def rename_to_base(adapter: Adapter, base_ref: str | Path) -> Adapter:
    """The adapter with module paths as the base names them and kinds resolved: every module,
    and every full tensor it carries, must fit the base (what a merge adds to these checks,
    such as a bias for a LoRA bias to land on, an adapter file does not need)."""
    if adapter.source_config.get("layer_replication"):
        # its modules are those of the model PEFT builds by replicating layers: kept as named
        return adapter
    base = open_base(base_ref)
    if adapter.base_init is not None:  # torch, only where the training changed the base
        from loramerge.model.base_init import rebuild_for_original_base

        adapter = rebuild_for_original_base(adapter, base)
    fitted = fit_adapter(adapter, base)
    carried = {
        **fitted.adapter.modules_to_save,
        **fitted.adapter.saved_biases,
        **fitted.adapter.base_tables,
    }
    names = [*carried, *(module + ".weight" for module in fitted.adapter.token_rows)]
    for name in names:
        param = fitted.param_name(name)
        if param is None:
            raise FormatError(
                f"the base model has no parameter {name} for the tensor the adapter carries",
                file=adapter.source_path,
                module=name,
                hint="is this adapter for another base model?",
            )
        if name in carried:
            shape = tuple(carried[name].shape)
            check_full_copy(param, fitted.param_shapes[param], shape, adapter.source_path, name)
    return fitted.adapter
