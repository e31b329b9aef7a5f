"""Shape checks of what an adapter carries against the base tensors it changes."""

from __future__ import annotations

from loramerge.adapter import LoraModule
from loramerge.errors import ShapeMismatchError


def check_bias(module: LoraModule, base_shape: tuple[int, ...], where: str | None) -> None:
    out_features = (module.lora_B.shape[0],)
    if base_shape != out_features or tuple(module.bias.shape) != out_features:
        raise ShapeMismatchError(
            f"base bias is {list(base_shape)}, LoRA bias is {list(module.bias.shape)}, "
            f"the layer has {out_features[0]} outputs",
            file=where,
            module=module.path,
        )


def check_full_copy(
    name: str, base: tuple[int, ...], full: tuple[int, ...], where: str | None, key: str
) -> None:
    """A full tensor the adapter carries may add rows (tokens added in training), no more."""
    if len(full) != len(base) or full[1:] != base[1:]:
        raise ShapeMismatchError(
            f"the base tensor {name} is {list(base)} but the adapter's copy is {list(full)}",
            file=where,
            module=key,
            hint="this adapter was trained for another base model",
        )
