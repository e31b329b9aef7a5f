"""Dense forms of updates whose exact LoRA is larger than the update itself: a LyCORIS full
module, a Kronecker product (LoKr) or a Hadamard product (LoHa) of high rank. Readers attach
them to the LoRA module (LoraModule.dense); a merge applies them instead of the factor product,
`convert` and `truncate` keep using the factors (docs/rules.md section 6)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from loramerge.adapter import DenseUpdate, LazyTensor, ModuleKind
from loramerge.formats.derived import derived
from loramerge.ops.lowrank_forms import tucker_down

F64 = torch.float64
Matrix = Callable[[], torch.Tensor]


def matrix_of(up: LazyTensor, down: LazyTensor, core: LazyTensor | None = None) -> Matrix:
    """A side's matrix in float64: up @ down, or with a Tucker core (up stored (r, out))
    up^T @ (core contracted with down), flattened to (out x in * kernel)."""

    def compute() -> torch.Tensor:
        if core is None:
            return up.read().to(F64) @ down.read().to(F64).reshape(down.shape[0], -1)
        flat = tucker_down(core.read(), down.read()).reshape(core.shape[0], -1)
        return up.read().to(F64).T @ flat

    return compute


def side_factors(
    up: LazyTensor, down: LazyTensor, core: LazyTensor | None = None
) -> tuple[tuple[Matrix, tuple[int, int]], tuple[Matrix, tuple[int, int]]]:
    """One Hadamard side as (B, A) functions with their shapes: up (out x r) and down
    (r x in * kernel), or with a Tucker core up^T and the core contracted with down."""
    if core is None:
        rank, width = down.shape[0], math.prod(down.shape[1:])
        return (lambda: up.read().to(F64), tuple(up.shape)), (
            lambda: down.read().to(F64).reshape(rank, -1),
            (rank, width),
        )
    width = down.shape[1] * math.prod(core.shape[2:])
    return (lambda: up.read().to(F64).T, (up.shape[1], up.shape[0])), (
        lambda: tucker_down(core.read(), down.read()).reshape(core.shape[0], -1),
        (core.shape[0], width),
    )


def hadamard_factors(sides) -> dict[str, tuple[Matrix, tuple[int, int]]]:
    """b1, a1, b2, a2 of two Hadamard sides, each (up, down, core or None)."""
    (b1, a1), (b2, a2) = (side_factors(*side) for side in sides)
    return {"b1": b1, "a1": a1, "b2": b2, "a2": a2}


def stored_matrix(full: LazyTensor) -> Matrix:
    """A side stored whole, as a float64 matrix (a conv side flattened to rows x in * kernel)."""
    return lambda: full.read().to(F64).reshape(full.shape[0], -1)


def kron_form(
    path: str,
    method: str,
    sides: tuple[tuple[Matrix, tuple[int, int]], tuple[Matrix, tuple[int, int]]],
    scale: float,
    why: str,
    *,
    kind: ModuleKind = ModuleKind.LINEAR,
    component: str | None = None,
    where: object = None,
) -> DenseUpdate:
    """W + s kron(W1, W2), each side (a function giving it, its matrix shape)."""
    (first, shape1), (second, shape2) = sides
    tensors = {
        "w1": derived(first, shape1, F64, path=where, module=path),
        "w2": derived(second, shape2, F64, path=where, module=path),
    }
    return DenseUpdate(
        path, method, "kron", tensors, params={"scale": scale},
        out_features=shape1[0] * shape2[0], kind=kind, component=component, why=why,
    )  # fmt: skip


def hadamard_form(
    path: str,
    method: str,
    factors: dict[str, tuple[Callable[[], torch.Tensor], tuple[int, int]]],
    scale: float,
    why: str,
    *,
    kind: ModuleKind = ModuleKind.LINEAR,
    component: str | None = None,
    where: object = None,
) -> DenseUpdate:
    """W + s (B1 A1) * (B2 A2): `factors` maps b1, a1, b2, a2 to (a function giving the float
    matrix, its shape)."""
    tensors = {
        name: derived(compute, shape, F64, path=where, module=path)
        for name, (compute, shape) in factors.items()
    }
    return DenseUpdate(
        path, method, "hadamard", tensors, params={"scale": scale},
        out_features=factors["b1"][1][0], kind=kind, component=component, why=why,
    )  # fmt: skip


def full_form(
    path: str,
    diff: LazyTensor,
    bias: LazyTensor | None,
    why: str,
    *,
    kind: ModuleKind = ModuleKind.LINEAR,
    component: str | None = None,
) -> DenseUpdate:
    """LyCORIS full: W + diff, b + diff_b."""
    tensors = {"delta": diff, **({"bias": bias} if bias is not None else {})}
    return DenseUpdate(
        path, "LyCORIS full", "add", tensors, out_features=diff.shape[0], kind=kind,
        bias="add" if bias is not None else None, component=component, why=why,
    )  # fmt: skip
