"""Checks an adapter must pass before anything is computed from it."""

from __future__ import annotations

import math

import torch

from loramerge.adapter import Adapter, LazyTensor
from loramerge.errors import FormatError


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
    found += [(name, "modules_to_save", t) for name, t in adapter.modules_to_save.items()]
    found += [(name, "base table", t) for name, t in adapter.base_tables.items()]
    return found


def check_adapter(adapter: Adapter, allow_nonfinite: bool = False) -> None:
    """Refuse an empty adapter, a scale that is not a positive finite number, and NaN or Inf
    values in any tensor unless explicitly allowed."""
    if not adapter.modules and not adapter.modules_to_save:
        raise FormatError("holds no LoRA modules", path=adapter.source_path)
    for module in adapter.modules.values():
        # a bad alpha reaches every weight of the module: refused even with --allow-nonfinite
        if not (math.isfinite(module.alpha) and module.alpha > 0) or module.r < 1:
            raise FormatError(
                f"alpha {module.alpha} with rank {module.r} gives no usable scale",
                path=adapter.source_path,
                module=module.path,
                hint="alpha must be a positive finite number and the rank at least 1",
            )
    if allow_nonfinite:
        return
    for module, part, tensor in _tensors(adapter):
        value = tensor.read()  # checked, not kept: a merge reads each module when it gets to it
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise FormatError(
                f"{part} holds {bad} NaN or Inf values",
                path=adapter.source_path,
                module=module,
                hint="the training diverged; pass --allow-nonfinite to merge it anyway",
            )
