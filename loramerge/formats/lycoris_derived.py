"""What LoHa and LoKr modules share once their factors are known: the module as the exact LoRA
those factors make, or, where that LoRA would be larger than the update itself, the dense form
a merge applies instead."""

from __future__ import annotations

from collections.abc import Callable

import torch

from loramerge.adapter import DenseUpdate, LazyTensor, LoraModule, ModuleKind
from loramerge.formats.derived_factors import derived_pair, high_rank_reason
from loramerge.formats.lycoris_parts import Context, kind_shapes, magnitude_of

# the dense form for a module too large for its LoRA form: (the reason, the module's kind)
DenseOf = Callable[[str | None, ModuleKind], DenseUpdate | None]


def derived_module(
    context: Context,
    name: str,
    parts: dict[str, LazyTensor],
    component: str | None,
    module_path: str,
    *,
    shape: tuple[int, int, tuple[int, ...]],
    rank: int,
    scale: float,
    label: str,
    compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    dense_of: DenseOf,
) -> LoraModule:
    """`shape` is (out features, in width, kernel); `compute` gives the exact factors
    of `rank`; `label` names the module in the too-large reason ("this LoHa module")."""
    out_features, width, kernel = shape
    kind, shape_b, shape_a = kind_shapes(out_features, rank, width, kernel)
    reason = high_rank_reason(rank, out_features, width, label)
    lora_b, lora_a = derived_pair(shape_b, shape_a, compute, reason)
    return LoraModule(
        path=module_path,
        lora_A=lora_a,
        lora_B=lora_b,
        alpha=scale * rank,
        kind=kind,
        magnitude=magnitude_of(context.path, name, parts, out_features),
        component=component,
        dense=dense_of(reason, kind),
    )
