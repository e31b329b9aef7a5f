"""The fallback when the base's architecture cannot be asked (remote code, no config): module
kinds and tensor names from the files' names and shapes, as loramerge did before it asked
transformers. Square weights are then ambiguous; the merge's notes say these rules were used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from loramerge.adapter import Adapter, LoraModule, ModuleKind
from loramerge.errors import FormatError, ShapeMismatchError
from loramerge.model import dense_fit
from loramerge.model.fit import Fitted, Target
from loramerge.model.folder import BaseModel
from loramerge.model.names import input_embedding_name, output_embedding_name, resolve_tensor_name

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
            file=path_hint,
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
        if any(size != 1 for size in b[2:]):
            raise ShapeMismatchError(
                f"conv lora_B must have a 1x..x1 kernel, got {list(b)}",
                file=path_hint,
                module=module.path,
            )
    if shape != expected:
        raise ShapeMismatchError(
            f"the base tensor is {list(shape)} but the adapter's update is {list(expected)}",
            file=path_hint,
            module=module.path,
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


def _tied_by_names(shapes: dict[str, tuple[int, ...]], config: Mapping[str, Any]) -> dict[str, str]:
    """lm_head tied to the input embedding when the files hold no head and the config ties."""
    embed = input_embedding_name(shapes)
    head = output_embedding_name(shapes)
    if head in shapes or embed is None or not bool(config.get("tie_word_embeddings", True)):
        return {}
    shapes[head] = shapes[embed]
    return {head: embed}


def fit_by_names(adapter: Adapter, base: BaseModel, reason: str) -> Fitted:
    shapes = {entry.name: tuple(entry.shape) for _, entry in base.tensors()}
    tied = _tied_by_names(shapes, base.config)
    where = adapter.source_path
    resolved: dict[str, tuple[LoraModule, str, tuple[int, ...]]] = {}
    open_square: list[tuple[LoraModule, str, tuple[int, ...]]] = []
    votes: set[ModuleKind] = set()
    for module in adapter.modules.values():
        if module.kind is ModuleKind.PARAMETER or adapter.source_config.get("target_parameters"):
            raise FormatError(
                "wraps a bare parameter (target_parameters); which parameter it is is known "
                f"only from the base's architecture, which transformers could not give: {reason}",
                file=where,
                module=module.path,
            )
        tensor = resolve_tensor_name(module.path + ".weight", shapes)
        if tensor is None:
            raise FormatError(
                f"the base model has no tensor {module.path}.weight for this adapter module",
                file=where,
                module=module.path,
                hint="is this adapter for another base model?",
            )
        shape = shapes[tensor]
        if module.kind in (ModuleKind.LINEAR, ModuleKind.CONV1D):
            kind = weight_kind(module, shape, where or "")
            if kind is None:
                open_square.append((module, tensor, shape))
                continue
            votes.add(kind)
        else:
            kind = module.kind
            check_shape(module, shape, where or "")
        resolved[module.path] = (replace(module, kind=kind), tensor, shape)
    square = square_kind(votes, base.config, [m for m, _, _ in open_square])
    for module, tensor, shape in open_square:
        resolved[module.path] = (replace(module, kind=square), tensor, shape)
    modules, targets = {}, {}
    for module, tensor, shape in resolved.values():
        path = tensor.removesuffix(".weight")
        modules[path] = replace(module, path=path)
        targets[path] = Target(path, tensor, module.kind, shape)
    note = (
        f"the base's architecture could not be asked ({reason}): module kinds and tensor names "
        "follow name-based rules"
    )
    conv1d = base.config.get("model_type") in CONV1D_MODEL_TYPES
    dense, dense_targets = dense_fit.fit_by_names(adapter, shapes, conv1d)
    adapter = replace(adapter, modules=modules, dense_updates=dense)
    return Fitted(adapter, targets, None, shapes, tied, "", [note], dense_targets)
