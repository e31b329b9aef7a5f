"""LoRA factors that a reader derives from another method's tensors (LoHa, LoKr, Tucker, full
updates): computed on first use and kept, and marked where no useful low-rank form exists."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule


class DerivedFactor(LazyTensor):
    """A factor computed from stored tensors. `merge_only` says why the LoRA it belongs to is
    no useful adapter on its own (a dense update in LoRA form): `merge` applies it exactly,
    `convert` refuses it."""

    def __init__(
        self,
        shape: tuple[int, ...],
        load: Callable[[], torch.Tensor],
        merge_only: str | None = None,
    ) -> None:
        super().__init__(shape, "F32", load)
        self.merge_only = merge_only


def derived_pair(
    shape_b: tuple[int, ...],
    shape_a: tuple[int, ...],
    compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    merge_only: str | None = None,
) -> tuple[DerivedFactor, DerivedFactor]:
    """(B, A) as lazy float32 factors of one computation. The pair is held only until both
    halves have been taken once, so a streaming merge (which reads factors without keeping
    them) does not keep it either; `LazyTensor.load` keeps what it loads as usual."""
    held: dict[int, torch.Tensor] = {}
    taken: set[int] = set()

    def part(index: int, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            if index not in held:
                lora_b, lora_a = compute()
                held.update({0: lora_b.to(torch.float32), 1: lora_a.to(torch.float32)})
                taken.clear()
            value = held[index].reshape(shape)
            taken.add(index)
            if len(taken) == 2:
                held.clear()
                taken.clear()
            return value

        return load

    return (
        DerivedFactor(shape_b, part(0, shape_b), merge_only),
        DerivedFactor(shape_a, part(1, shape_a), merge_only),
    )


def is_low_rank(rank: int, out_features: int, in_features: int) -> bool:
    """Whether a LoRA of this rank is smaller than the dense update it stands for."""
    return rank * (out_features + in_features) <= out_features * in_features


def merge_only_reason(module: LoraModule) -> str | None:
    for factor in (module.lora_A, module.lora_B):
        if isinstance(factor, DerivedFactor) and factor.merge_only:
            return factor.merge_only
    return None


def merge_only_modules(adapter: Adapter) -> dict[str, str]:
    """{module key: why it has no useful LoRA form} for the modules `convert` must refuse."""
    found = {}
    for key, module in adapter.modules.items():
        reason = merge_only_reason(module)
        if reason:
            found[key] = reason
    return found


def high_rank_reason(rank: int, out_features: int, in_features: int, what: str) -> str | None:
    """The merge-only reason for an exact LoRA form of `rank`, None when it is low-rank."""
    if is_low_rank(rank, out_features, in_features):
        return None
    dense = out_features * in_features
    return (
        f"{what} is exactly a LoRA of rank {rank}, which has "
        f"{rank * (out_features + in_features):,} parameters: more than the dense "
        f"{out_features} x {in_features} update ({dense:,}); it has no low-rank form"
    )


def flat_width(shape: tuple[int, ...]) -> int:
    """Columns of a weight seen as a matrix (in * kernel for convs)."""
    return math.prod(shape[1:])
