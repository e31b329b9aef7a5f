"""Dense updates (IA3, OFT, LyCORIS full, ...) fitted to the base: the parameter each one
changes, its kind, and the sizes its rule needs, checked against the base's weight.

The weight is seen as the (out x in) matrix the layer multiplies: a Linear weight as stored, a
Conv1D weight transposed, a convolution's kernel flattened to (out x in * kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from loramerge.adapter import Adapter, DenseUpdate, ModuleKind
from loramerge.errors import FormatError, ShapeMismatchError
from loramerge.model.fit import Fitted, Target

if TYPE_CHECKING:
    from loramerge.model.architecture import Architecture

# the layers each rule applies to: those PEFT (or LyCORIS) builds it on, in layouts whose
# stored rows a tile can take (rules that mix a row's inputs need the inputs along the rows)
KINDS = {
    "scale_out": (ModuleKind.LINEAR, ModuleKind.CONV1D, ModuleKind.CONV),
    "scale_in": (ModuleKind.LINEAR, ModuleKind.CONV1D, ModuleKind.CONV),
    "fourier": (ModuleKind.LINEAR, ModuleKind.CONV1D),
    "randlora": (ModuleKind.LINEAR, ModuleKind.CONV1D),
    "add": (ModuleKind.LINEAR, ModuleKind.CONV),
    "kron": (ModuleKind.LINEAR, ModuleKind.CONV),
    "hadamard": (ModuleKind.LINEAR, ModuleKind.CONV),
    # a convolution's kernel as (out x in * kernel): BOFT and HRA rotate and reflect its rows
    "rotate_in": (ModuleKind.LINEAR, ModuleKind.CONV),
    "reflect_in": (ModuleKind.LINEAR, ModuleKind.CONV),
}
LINEAR_ONLY = (ModuleKind.LINEAR,)  # MiSS blocks, SHiRA, C3A


def matrix_shape(kind: ModuleKind, shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, in) of the matrix the layer multiplies, from the weight's stored shape."""
    if kind is ModuleKind.CONV1D:
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def fit_update(
    update: DenseUpdate, kind: ModuleKind | None, shape: tuple[int, ...], where: str | None
) -> DenseUpdate:
    """The update with the base's kind, refused where its rule does not apply or its sizes do
    not fit the weight."""
    allowed = KINDS.get(update.rule, LINEAR_ONLY)
    why = update.unmergeable.get(kind.value) if kind is not None else None
    if why:
        raise FormatError(
            f"is {update.method} on a {kind.value} layer: {why}", file=where, module=update.path
        )
    if kind not in allowed or (kind is ModuleKind.CONV) != (len(shape) > 2):
        what = kind.value if kind is not None else "a module type no tuner adapts"
        layers = ", ".join(k.value for k in allowed)
        raise FormatError(
            f"is {update.method} on a {what} layer; loramerge merges it on {layers} layers",
            file=where,
            module=update.path,
        )
    out_features, in_features = matrix_shape(kind, shape)
    for name, want, have in (
        ("outputs", update.out_features, out_features),
        ("inputs", update.in_features, in_features),
    ):
        if want is not None and want != have:
            raise ShapeMismatchError(
                f"{update.method} here has {want} {name}, the base weight {list(shape)} has {have}",
                file=where,
                module=update.path,
                hint="this adapter was trained for another base model",
            )
    problem = CHECKS.get(update.rule, _no_check)(update, (out_features, in_features), shape)
    if problem:
        raise ShapeMismatchError(
            f"{update.method} does not fit the base weight {list(shape)}: {problem}",
            file=where,
            module=update.path,
            hint="this adapter was trained for another base model",
        )
    return replace(update, kind=kind)


def _no_check(update: DenseUpdate, matrix: tuple[int, int], shape: tuple[int, ...]) -> str:
    return ""


def _rotation(update: DenseUpdate, matrix: tuple[int, int], shape: tuple[int, ...]) -> str:
    blocks = update.tensors["blocks"].shape
    size, count = blocks[-1], blocks[-3]
    if matrix[1] % size or (count != 1 and count * size != matrix[1]):
        return f"{count} rotation blocks of {size} inputs do not cover {matrix[1]} inputs"
    return ""


def _scale_in(update: DenseUpdate, matrix: tuple[int, int], shape: tuple[int, ...]) -> str:
    count = math.prod(update.tensors["scale"].shape)
    inputs = shape[1] if len(shape) > 2 else matrix[1]  # a convolution: one per channel
    return f"ia3_l has {count} scales for {inputs} inputs" if count != inputs else ""


def _miss(update: DenseUpdate, matrix: tuple[int, int], shape: tuple[int, ...]) -> str:
    size = update.tensors["blocks"].shape[-1]
    return f"{matrix[1]} inputs are not blocks of {size}" if matrix[1] % size else ""


def _fourier(update: DenseUpdate, matrix: tuple[int, int], shape: tuple[int, ...]) -> str:
    count = update.params["frequencies"]
    return (
        f"{count} frequencies exceed the {matrix[0] * matrix[1]} entries"
        if count > matrix[0] * matrix[1]
        else ""
    )


def _scatter(update: DenseUpdate, matrix: tuple[int, int], shape: tuple[int, ...]) -> str:
    indices = update.tensors["indices"].read()
    if indices.numel() and (
        int(indices.min()) < 0
        or int(indices[0].max()) >= matrix[0]
        or int(indices[1].max()) >= matrix[1]
    ):
        return "shira_indices point outside the weight"
    return ""


def _randlora(update: DenseUpdate, matrix: tuple[int, int], shape: tuple[int, ...]) -> str:
    smaller, larger = min(matrix), max(matrix)
    if smaller != update.params["min_features"] or larger > update.params["max_features"]:
        return (
            f"randlora_gamma is for layers of smaller size {update.params['min_features']} and "
            f"the shared bases for at most {update.params['max_features']}"
        )
    return ""


def _add(update: DenseUpdate, matrix: tuple[int, int], shape: tuple[int, ...]) -> str:
    delta = update.tensors["delta"].shape
    return (
        f"the difference is {list(delta)}"
        if math.prod(delta) != math.prod(shape) or delta[0] != shape[0]
        else ""
    )


CHECKS: dict[str, Callable[[DenseUpdate, tuple[int, int], tuple[int, ...]], str]] = {
    "scale_in": _scale_in,
    "rotate_in": _rotation,
    "miss_bat": _miss,
    "fourier": _fourier,
    "scatter": _scatter,
    "randlora": _randlora,
    "add": _add,
}


def fit_by_architecture(
    adapter: Adapter,
    architecture: Architecture,
    find_module: Callable[[str, Architecture, Adapter], str],
) -> tuple[dict[str, DenseUpdate], dict[str, Target]]:
    """Every dense update on the module the architecture names, with the targets they change."""
    updates, targets = {}, {}
    for update in adapter.dense_updates.values():
        path = find_module(update.path, architecture, adapter)
        shape = architecture.parameters.get(path + ".weight")
        if shape is None:
            raise FormatError(
                f"module {path} has no weight parameter", file=adapter.source_path, module=path
            )
        kind = architecture.modules[path].kind
        fitted = fit_update(replace(update, path=path), kind, shape, adapter.source_path)
        if path in updates:
            raise FormatError(
                f"two of its modules are the base's module {path}",
                file=adapter.source_path,
                module=path,
            )
        updates[path] = fitted
        targets[path] = Target(path, path + ".weight", fitted.kind, shape)
    return updates, targets


def fit_by_names(
    adapter: Adapter, shapes: dict[str, tuple[int, ...]], conv1d_model: bool
) -> tuple[dict[str, DenseUpdate], dict[str, Target]]:
    """Without an architecture: the tensor `<path>.weight`, a convolution when it has more than
    two dimensions, else Conv1D for GPT-2-like model types or where only the transposed shape
    fits the update's sizes, else Linear."""
    from loramerge.model.names import resolve_tensor_name

    updates, targets = {}, {}
    for update in adapter.dense_updates.values():
        tensor = resolve_tensor_name(update.path + ".weight", shapes)
        if tensor is None:
            raise FormatError(
                f"the base model has no tensor {update.path}.weight for this adapter module",
                file=adapter.source_path,
                module=update.path,
                hint="is this adapter for another base model?",
            )
        shape = shapes[tensor]
        path = tensor.removesuffix(".weight")
        kind = ModuleKind.CONV if len(shape) > 2 else ModuleKind.LINEAR
        flipped = (update.out_features, update.in_features) in ((shape[1], None), (None, shape[0]))
        if len(shape) == 2 and (conv1d_model or (flipped and shape[0] != shape[1])):
            kind = ModuleKind.CONV1D
        updates[path] = fit_update(replace(update, path=path), kind, shape, adapter.source_path)
        targets[path] = Target(path, tensor, kind, shape)
    return updates, targets


def with_dense_forms(fitted: Fitted) -> Fitted:
    """What a merge applies: modules that also carry a dense form (the exact LoRA form of a
    LyCORIS full module, of a high-rank LoKr or LoHa is larger than the update itself) are
    applied through it instead, on the layers where it streams as stored (linear and conv
    layers) and without DoRA."""
    adapter = fitted.adapter
    moved = {
        key: replace(module.dense, path=module.path, component=module.component, kind=module.kind)
        for key, module in adapter.modules.items()
        if module.dense is not None
        and module.magnitude is None
        and module.kind in (ModuleKind.LINEAR, ModuleKind.CONV)
    }
    if not moved:
        return fitted
    modules = {k: m for k, m in adapter.modules.items() if k not in moved}
    dense = {**adapter.dense_updates, **moved}
    return replace(
        fitted,
        adapter=replace(adapter, modules=modules, dense_updates=dense),
        targets={k: t for k, t in fitted.targets.items() if k not in moved},
        dense_targets={**fitted.dense_targets, **{k: fitted.targets[k] for k in moved}},
    )


def check_dense_bias(update: DenseUpdate, shape: tuple[int, ...], where: str | None) -> None:
    """The bias a dense update adds to or scales has one value per output."""
    vector = update.tensors["bias" if update.bias == "add" else "scale"]
    if math.prod(vector.shape) != math.prod(shape) or len(shape) != 1:
        raise ShapeMismatchError(
            f"the base bias is {list(shape)} but {update.method} has {math.prod(vector.shape)} "
            "values for it",
            file=where,
            module=update.path,
        )
