"""Checks an adapter must pass before anything is computed from it, and the one way jobs read
an adapter: read, then check."""

from __future__ import annotations

import math
from pathlib import Path

from loramerge.adapter import Adapter, LazyTensor
from loramerge.errors import FormatError, located, opt, unmeasurable_factors
from loramerge.formats.registry import ReadOptions, check_user_alpha, read_adapter


def read_checked(
    path: str | Path,
    fmt: str | None = None,
    options: ReadOptions | None = None,
    *,
    allow_nonfinite: bool = False,
) -> Adapter:
    """The adapter at `path` (local or a cached hub repo id), refused when `check_adapter`
    refuses it, or when the user supplied an alpha for a format that stores its own."""
    adapter = read_adapter(path, fmt, options)
    check_user_alpha(adapter, options.alpha if options is not None else None)
    check_adapter(adapter, allow_nonfinite)
    return adapter


def _tensors(adapter: Adapter) -> list[tuple[str, str, LazyTensor]]:
    found = []
    for module in adapter.modules.values():
        for part, tensor in (
            ("lora_A", module.lora_A),
            ("lora_B", module.lora_B),
            ("magnitude", module.magnitude),
            ("bias", module.bias),
        ):
            if tensor is not None:
                found.append((module.path, part, tensor))
    for update in adapter.dense_updates.values():
        found += [(update.path, part, tensor) for part, tensor in update.tensors.items()]
    found += [(name, "modules_to_save", t) for name, t in adapter.modules_to_save.items()]
    found += [(name, "base table", t) for name, t in adapter.base_tables.items()]
    return found


def check_adapter(adapter: Adapter, allow_nonfinite: bool = False) -> None:
    """Refuse an empty adapter, a scale that is not a positive finite number, and NaN or Inf
    values in any tensor unless explicitly allowed."""
    check_scales(adapter)
    if not allow_nonfinite:
        check_values(adapter)


def check_scales(adapter: Adapter) -> None:
    """The checks that read no tensor: some module, and usable scales."""
    if not adapter.modules and not adapter.modules_to_save and not adapter.dense_updates:
        raise FormatError("holds no LoRA modules", file=adapter.source_path)
    for module in adapter.modules.values():
        # a bad alpha reaches every weight of the module: refused even when non-finite values
        # are allowed
        if not (math.isfinite(module.alpha) and module.alpha > 0) or module.r < 1:
            raise FormatError(
                f"alpha {module.alpha} with rank {module.r} gives no usable scale",
                file=adapter.source_path,
                module=module.path,
                hint="alpha must be a positive finite number and the rank at least 1",
            )


def check_values(adapter: Adapter) -> None:
    """Refuse NaN or Inf in any tensor (each read and checked, not kept: a merge reads each
    module when it gets to it)."""
    for module, part, tensor in _tensors(adapter):
        bad = nonfinite_count(tensor)
        if bad:
            raise FormatError(
                f"{part} holds {bad} NaN or Inf values",
                file=adapter.source_path,
                module=module,
                hint=f"the training diverged; pass {opt('allow_nonfinite')} to merge it anyway",
            )


def nonfinite_count(tensor: LazyTensor) -> int:
    """NaN and Inf elements of a tensor: from its stored bytes where it is stored as is in a
    file and not loaded yet (no torch needed), else from its value."""
    if tensor.raw is not None and not tensor.loaded:
        from loramerge.ops.bits import nonfinite_count as count_stored

        stored, code = tensor.raw()
        found = count_stored(stored, code)
        if found is not None:
            return found
    import torch

    value = tensor.read()
    return int((~torch.isfinite(value)).sum()) if value.is_floating_point() else 0


def refuse_dense_updates(adapter: Adapter, what: str, hint: str | None = None) -> None:
    """Refuse an adapter with dense updates (IA3, OFT, ...) for anything but a merge: they have
    no LoRA form, so no adapter file or engine can hold them. `what` is the job refusing."""
    if not adapter.dense_updates:
        return
    key, update = next(iter(adapter.dense_updates.items()))
    name = update.method
    if adapter.source_format.startswith("peft-"):
        peft_type = adapter.source_format.removeprefix("peft-").upper()
        shown = f" ({name})" if name.upper() != peft_type else ""
        name = f"peft_type {peft_type}{shown}"
    count = len(adapter.dense_updates)
    raise FormatError(
        f"{name} has no plain-LoRA form: {update.why}; it is merge-only, so {what} cannot take "
        f"it ({count} module{'s' if count > 1 else ''}, e.g. {key})",
        file=adapter.source_path,
        hint=hint or "`loramerge merge` applies it exactly to the base model",
    )


def check_measurable(adapter: Adapter, file: str | Path | None = None) -> None:
    """Refuse, as the norms of a report would, LoRA factors holding NaN or Inf (which
    --allow-nonfinite let through): before anything is written, where the report is measured
    while the output is."""
    for path, module in adapter.modules.items():
        if nonfinite_count(module.lora_A) or nonfinite_count(module.lora_B):
            with located(file or adapter.source_path, path):
                raise unmeasurable_factors()
