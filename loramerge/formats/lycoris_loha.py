"""LyCORIS LoHa modules (plain and Tucker), as the exact LoRA of rank r*r of their Hadamard
product, with the dense form a merge applies when that LoRA is larger than the update."""

from __future__ import annotations

import math

import torch

from loramerge.adapter import DenseUpdate, LazyTensor, LoraModule, ModuleKind
from loramerge.formats import dense_forms
from loramerge.formats.lycoris_derived import derived_module
from loramerge.formats.lycoris_parts import (
    Context,
    alpha_of,
    bad_shapes,
    flat_kernel,
    need,
)
from loramerge.ops.lowrank_forms import hadamard_factors, tucker_down


def loha(
    context: Context,
    name: str,
    parts: dict[str, LazyTensor],
    component: str | None,
    module_path: str,
) -> LoraModule:
    keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    w1a, w1b, w2a, w2b = need(context.path, name, parts, *keys)
    t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
    if (t1 is None) != (t2 is None) or any(len(t.shape) != 2 for t in (w1a, w1b, w2a, w2b)):
        raise bad_shapes(context, name, parts)
    if t1 is not None and t2 is not None:  # Tucker: w*_a is (r, out), w*_b is (r, in)
        out_features, in_features = w1a.shape[1], w1b.shape[1]
        kernel = tuple(t1.shape[2:])
        fits = (
            len(t1.shape) == 4 == len(t2.shape)
            and t1.shape[:2] == (w1a.shape[0], w1b.shape[0])
            and t2.shape[:2] == (w2a.shape[0], w2b.shape[0])
            and t1.shape[2:] == t2.shape[2:]
            and (w2a.shape[1], w2b.shape[1]) == (out_features, in_features)
        )
        if not fits:
            raise bad_shapes(context, name, parts)
        width = in_features * math.prod(kernel)
        sides = [(w1a, w1b, t1), (w2a, w2b, t2)]
        ranks = (w1a.shape[0], w2a.shape[0])
    else:
        out_features, width = w1a.shape[0], w1b.shape[1]
        if (
            w1a.shape[1] != w1b.shape[0]
            or w2a.shape[1] != w2b.shape[0]
            or (w2a.shape[0], w2b.shape[1]) != (out_features, width)
        ):
            raise bad_shapes(context, name, parts)
        kernel = flat_kernel(context, name, component, module_path, width, parts)
        sides = [(w1a, w1b, None), (w2a, w2b, None)]
        ranks = (w1a.shape[1], w2a.shape[1])
    r = w1b.shape[0]
    scale = alpha_of(context.path, name, parts, r) / r
    rank = ranks[0] * ranks[1]

    def side(up: LazyTensor, down: LazyTensor, core: LazyTensor | None):
        if core is None:
            return up.float(), down.float()
        return up.float().T, tucker_down(core.float(), down.float()).reshape(core.shape[0], -1)

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        return hadamard_factors(*side(*sides[0]), *side(*sides[1]))

    def dense_of(reason: str | None, kind: ModuleKind) -> DenseUpdate | None:
        return _loha_dense(context, module_path, sides, scale, reason, kind, component)

    return derived_module(
        context, name, parts, component, module_path,
        shape=(out_features, width, kernel), rank=rank, scale=scale, label="this LoHa module",
        compute=compute, dense_of=dense_of,
    )  # fmt: skip


def _loha_dense(
    context: Context,
    path: str,
    sides: list,
    scale: float,
    reason: str | None,
    kind: ModuleKind,
    component: str | None,
) -> DenseUpdate | None:
    """The dense form a merge applies when the LoRA form is larger than the update."""
    if not reason:
        return None
    factors = dense_forms.hadamard_factors(sides)
    return dense_forms.hadamard_form(
        path, "LyCORIS LoHa", factors, scale, reason, kind=kind, component=component,
        where=context.path,
    )  # fmt: skip
