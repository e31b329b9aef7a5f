"""How an adapter module fits its base tensor: Conv1D-or-linear layout and shape checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loramerge.adapter import LoraModule, ModuleKind
from loramerge.errors import ShapeMismatchError

# Architectures whose linear layers are transformers' Conv1D (weights stored in x out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def weight_kind(module: LoraModule, shape: tuple[int, ...], path_hint: str) -> ModuleKind | None:
    """LINEAR or CONV1D from the base shape; None when a square shape leaves it open."""
    out_features, in_features = module.lora_B.shape[0], module.lora_A.shape[1]
    if len(shape) != 2 or {shape[0], shape[1]} != {out_features, in_features}:
        raise ShapeMismatchError(
            f"the base tensor is {list(shape)} but the adapter's update is "
            f"[{out_features}, {in_features}] "
            f"(B {list(module.lora_B.shape)}, A {list(module.lora_A.shape)})",
            path=path_hint,
            module=module.path,
            hint="this adapter was trained for another base model",
        )
    if out_features == in_features:
        return None
    return ModuleKind.LINEAR if shape == (out_features, in_features) else ModuleKind.CONV1D


def check_shape(module: LoraModule, shape: tuple[int, ...], path_hint: str) -> None:
    a, b = module.lora_A.shape, module.lora_B.shape
    if module.kind is ModuleKind.EMBEDDING:
        expected: tuple[int, ...] = (a[1], b[0])
    else:  # conv
        expected = (b[0], a[1], *a[2:])
        if tuple(b[2:]) != (1, 1):
            raise ShapeMismatchError(
                f"conv lora_B must be 1x1, got {list(b)}", path=path_hint, module=module.path
            )
    if shape != expected:
        raise ShapeMismatchError(
            f"the base tensor is {list(shape)} but the adapter's update is {list(expected)}",
            path=path_hint,
            module=module.path,
            hint="this adapter was trained for another base model",
        )


def check_bias(module: LoraModule, base_shape: tuple[int, ...], where: str | None) -> None:
    out_features = (module.lora_B.shape[0],)
    if base_shape != out_features or tuple(module.bias.shape) != out_features:
        raise ShapeMismatchError(
            f"base bias is {list(base_shape)}, LoRA bias is {list(module.bias.shape)}, "
            f"the layer has {out_features[0]} outputs",
            path=where,
            module=module.path,
        )


def check_full_copy(
    name: str, base: tuple[int, ...], full: tuple[int, ...], where: str | None, key: str
) -> None:
    """A full tensor the adapter carries may add rows (tokens added in training), no more."""
    if len(full) != len(base) or full[1:] != base[1:]:
        raise ShapeMismatchError(
            f"the base tensor {name} is {list(base)} but the adapter's copy is {list(full)}",
            path=where,
            module=key,
            hint="this adapter was trained for another base model",
        )


def square_kind(
    votes: set[ModuleKind], config: Mapping[str, Any], modules: list[LoraModule]
) -> ModuleKind:
    """Square weights cannot show their layout: follow the model's other modules, then its
    architecture, then the adapter's fan_in_fan_out claim."""
    if len(votes) == 1:
        return next(iter(votes))
    if config.get("model_type") in CONV1D_MODEL_TYPES:
        return ModuleKind.CONV1D
    if config.get("model_type"):
        return ModuleKind.LINEAR
    return ModuleKind.CONV1D if any(m.fan_in_fan_out for m in modules) else ModuleKind.LINEAR
