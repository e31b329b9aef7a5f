"""LyCORIS LoKr modules (each side full, factored or Tucker), as the exact LoRA of rank
rank(W1)*rank(W2) of their Kronecker product, with the dense form a merge applies when that
LoRA is larger than the update."""

from __future__ import annotations

import math

import torch

from loramerge.adapter import DenseUpdate, LazyTensor, LoraModule, ModuleKind
from loramerge.errors import FormatError
from loramerge.formats import dense_forms
from loramerge.formats.lycoris_derived import derived_module
from loramerge.formats.lycoris_parts import (
    Context,
    alpha_of,
    bad_shapes,
    flat_kernel,
)
from loramerge.ops.lowrank_forms import exact_factors, kronecker_factors, tucker_down


def _lokr_side(
    context: Context, name: str, parts: dict[str, LazyTensor], which: str
) -> tuple[tuple[int, int], int, tuple[int, ...] | None, bool, object]:
    """One Kronecker side: ((rows, columns of its matrix), its rank, its kernel (None when
    flattened: unknown), whether it is stored full, and a function giving (B_i, A_i))."""
    full = parts.get(f"lokr_{which}")
    up, down = parts.get(f"lokr_{which}_a"), parts.get(f"lokr_{which}_b")
    core = parts.get(f"lokr_t{which[-1]}")
    if full is not None:
        if up is not None or down is not None or core is not None or len(full.shape) not in (2, 4):
            raise bad_shapes(context, name, parts)
        if which == "w1" and len(full.shape) != 2:
            raise bad_shapes(context, name, parts)
        rows, kernel = full.shape[0], tuple(full.shape[2:])
        # the exact rank of a stored matrix is its numerical rank: factor it once, now
        lora_b, lora_a = exact_factors(full.float().reshape(rows, -1))
        return (rows, lora_a.shape[1]), lora_a.shape[0], kernel, True, lambda: (lora_b, lora_a)
    if up is None or down is None or len(up.shape) != 2 or len(down.shape) != 2:
        raise FormatError(
            f"has neither lokr_{which} nor both lokr_{which}_a and lokr_{which}_b",
            file=context.path,
            module=name,
        )
    if core is not None:  # Tucker (w2 only): t2 (r, r, kh, kw), w2_a (r, c), w2_b (r, d)
        if len(core.shape) != 4 or core.shape[:2] != (up.shape[0], down.shape[0]):
            raise bad_shapes(context, name, parts)
        kernel = tuple(core.shape[2:])

        def tucker() -> tuple[torch.Tensor, torch.Tensor]:
            flat = tucker_down(core.float(), down.float()).reshape(core.shape[0], -1)
            return up.float().T, flat

        return (up.shape[1], down.shape[1] * math.prod(kernel)), up.shape[0], kernel, False, tucker
    if up.shape[1] != down.shape[0]:
        raise bad_shapes(context, name, parts)
    kernel = None if which == "w2" else ()
    return (
        (up.shape[0], down.shape[1]),
        up.shape[1],
        kernel,
        False,
        lambda: (up.float(), down.float()),
    )


def lokr(
    context: Context,
    name: str,
    parts: dict[str, LazyTensor],
    component: str | None,
    module_path: str,
) -> LoraModule:
    (a, b), rank1, _, full1, side1 = _lokr_side(context, name, parts, "w1")
    (c, dk), rank2, kernel, full2, side2 = _lokr_side(context, name, parts, "w2")
    out_features, width = a * c, b * dk
    if kernel is None:
        kernel = flat_kernel(context, name, component, module_path, width, parts)
    if full1 and full2:
        scale = 1.0  # LyCORIS stores alpha = dim for two full sides and ignores it
    else:
        r = (parts.get("lokr_w1_b") or parts["lokr_w2_b"]).shape[0]
        scale = alpha_of(context.path, name, parts, r) / r
    rank = rank1 * rank2

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        return kronecker_factors(*side1(), *side2())

    def dense_of(reason: str | None, kind: ModuleKind) -> DenseUpdate | None:
        if not reason:
            return None
        sides = ((_lokr_matrix(parts, "w1"), (a, b)), (_lokr_matrix(parts, "w2"), (c, dk)))
        return dense_forms.kron_form(
            module_path, "LyCORIS LoKr", sides, scale, reason, kind=kind, component=component,
            where=context.path,
        )  # fmt: skip

    return derived_module(
        context, name, parts, component, module_path,
        shape=(out_features, width, kernel), rank=rank, scale=scale, label="this LoKr module",
        compute=compute, dense_of=dense_of,
    )  # fmt: skip


def _lokr_matrix(parts: dict[str, LazyTensor], which: str) -> dense_forms.Matrix:
    """One Kronecker side as stored (full, factored or Tucker), as a float64 matrix."""
    full = parts.get(f"lokr_{which}")
    if full is not None:
        return dense_forms.stored_matrix(full)
    up, down = parts[f"lokr_{which}_a"], parts[f"lokr_{which}_b"]
    return dense_forms.matrix_of(up, down, parts.get(f"lokr_t{which[-1]}"))
