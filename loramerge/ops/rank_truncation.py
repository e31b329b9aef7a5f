"""Rank truncation: DyLoRA prefixes (docs/rules.md section 2) and optimal SVD reduction
(section 3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule, lora_scale
from loramerge.errors import OptionError, located, opt
from loramerge.lazy_tensor import RecentValues
from loramerge.ops.lowrank import (
    difference_frobenius_norm,
    qr_core,
    reduce_core,
    update_frobenius_norm,
)
from loramerge.ops.rank_choice import rank_for_energy


@dataclass(frozen=True)
class ModuleRow:
    """What one module's transform did. Norms are ||dW||_F of the update before and after;
    `relative_error` = ||dW_after - dW_before||_F / ||dW_before||_F (0 for a zero update).
    `energy_kept` (sum of the kept S_i^2 over all S_i^2) is defined for SVD reductions only: a
    DyLoRA prefix is not a projection of the full-rank update, so it is None there."""

    module: str
    rank_before: int
    rank_after: int
    energy_kept: float | None
    relative_error: float
    norm_before: float
    norm_after: float


@dataclass(frozen=True)
class RankSize:
    """Size of a DyLoRA adapter's update at rank b, summed over modules (root of sum of squares):
    `update_norm` = ||dW_b||_F and `change_from_full` = ||dW_b - dW_rmax||_F / ||dW_rmax||_F."""

    rank: int
    update_norm: float
    change_from_full: float


def prefix_factors(
    lora_b: torch.Tensor, lora_a: torch.Tensor, b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-b DyLoRA factors: B[:, :b] (out x b) and A[:b] (b x in); dtype and trailing conv
    dimensions are kept. With alpha unchanged and r = b a standard reader applies alpha / b."""
    return lora_b[:, :b].contiguous(), lora_a[:b].contiguous()


def check_prefix_rank(b: int, ranks: dict[str, int], unit: int) -> list[str]:
    """Refuse b (at least 1) above a module's trained rank; warn when b is not a multiple of
    unit."""
    too_small = {path: r for path, r in ranks.items() if r < b}
    if too_small:
        path, r = next(iter(too_small.items()))
        raise OptionError(
            f"is above the trained rank r_max = {r}",
            module=path,
            option="rank",
            value=b,
            hint=f"choose a rank from 1 to {min(ranks.values())}",
        )
    if b % unit:
        return [
            f"rank {b} is not a multiple of the DyLoRA unit {unit}: only multiples of {unit} were "
            "trained as prefixes"
        ]
    return []


def truncate_prefix(adapter: Adapter, b: int) -> tuple[Adapter, list[ModuleRow]]:
    """Every module cut to its first b ranks, alpha kept, r = b (docs/rules.md section 2).

    Call `check_prefix_rank` first. DoRA magnitudes and LoRA biases are refused: DyLoRA trains
    neither, so nothing says how they would follow a truncation.
    """
    modules, rows = {}, []
    for path, module in adapter.modules.items():
        if module.magnitude is not None or module.bias is not None:
            raise OptionError(
                "has a DoRA magnitude or a LoRA bias, which DyLoRA prefix truncation does not "
                "define",
                module=path,
                option="method",
                value="prefix",
                hint=f"use {opt('method')} svd",
            )
        cut = replace(
            module, lora_A=_prefix_rows(module.lora_A, b), lora_B=_prefix_columns(module.lora_B, b)
        )
        modules[path] = cut
        rows.append(_compare(module, cut, energy=None))
    return replace(adapter, modules=modules), rows


def _prefix_rows(lora_a: LazyTensor, b: int) -> LazyTensor:
    """A[:b], cut from the stored A each time it is read (nothing kept)."""
    shape = (b, *lora_a.shape[1:])
    return LazyTensor(shape, lora_a.code or lora_a.dtype, lambda: lora_a.read()[:b].contiguous())


def _prefix_columns(lora_b: LazyTensor, b: int) -> LazyTensor:
    """B[:, :b], cut from the stored B each time it is read (nothing kept)."""
    shape = (lora_b.shape[0], b, *lora_b.shape[2:])
    return LazyTensor(shape, lora_b.code or lora_b.dtype, lambda: lora_b.read()[:, :b].contiguous())


def reduce_svd(
    adapter: Adapter,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    *,
    keep: bool = True,
) -> tuple[Adapter, list[ModuleRow]]:
    """The Frobenius-optimal reduction of every module via the QR core (docs/rules.md section 3).

    A fixed `rank` gives each module min(rank, its r); `energy` gives each module the smallest
    rank keeping that share of its update's energy, capped at `max_rank`. The scale is folded
    into the factors (float32), so each module gets r = alpha = its new rank and no rsLoRA; a
    LoRA bias is multiplied by the old scale to stay exact. DoRA magnitudes are kept. With
    `keep` False, the reduced factors are not held: each module's reduction is computed again
    when its factors are read (for a merge, whose memory then grows with no adapter).
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of a target rank and an energy threshold")
    modules, rows = {}, []
    recent = RecentValues()
    for path, module in adapter.modules.items():
        lora_b, lora_a = module.factors(keep=False)
        with located(adapter.source_path, path):
            core = qr_core(lora_b, lora_a, module.scale)
        if rank is not None:
            k = min(rank, module.r)
        else:
            k = rank_for_energy(core.singular_values(), energy, max_rank)
        reduced = reduce_core(core, k, dtype=torch.float32)
        bias = module.bias
        if bias is not None:
            bias = LazyTensor.of(bias.float() * module.scale)
        if keep:
            new = module.with_factors(reduced.B, reduced.A, float(k))
        else:
            new = module.with_computed_factors(_reduction(module, k, recent), k, float(k))
        modules[path] = replace(new, use_rslora=False, bias=bias)
        squares = reduced.singular_values.square()
        rows.append(
            ModuleRow(
                module=path,
                rank_before=module.r,
                rank_after=k,
                energy_kept=reduced.energy_kept,
                relative_error=reduced.relative_error,
                norm_before=float(squares.sum().sqrt()),
                norm_after=float(squares[:k].sum().sqrt()),
            )
        )
    return replace(adapter, modules=modules), rows


def _reduction(
    module: LoraModule, k: int, recent: RecentValues
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """The rank-k reduction's float32 (B, A) of a module, computed as `reduce_svd` computes it,
    both factors from one computation while the module is among the recent ones."""

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        lora_b, lora_a = module.factors(keep=False)
        reduced = reduce_core(qr_core(lora_b, lora_a, module.scale), k, dtype=torch.float32)
        return reduced.B, reduced.A

    return lambda: recent.get(module.path, compute)


def dylora_rank_profile(adapter: Adapter, unit: int = 1) -> list[RankSize]:
    """The update's size at every trained rank b (multiples of unit, and r_max) up to r_max,
    the smallest rank of any module, with DyLoRA's alpha / b scale. Shows where more rank stops
    changing the model."""
    if not adapter.modules:
        return []
    r_max = min(module.r for module in adapter.modules.values())
    ranks = sorted({*range(unit, r_max + 1, unit), r_max})
    full = {}
    for path, module in adapter.modules.items():
        full[path] = (*module.factors(), module.scale)
    full_sq = 0.0
    for path, factors in full.items():
        with located(adapter.source_path, path):
            full_sq += update_frobenius_norm(*factors) ** 2
    sizes = []
    for b in ranks:
        size_sq, change_sq = 0.0, 0.0
        for path, module in adapter.modules.items():
            lora_b, lora_a, scale = full[path]
            cut_b, cut_a = prefix_factors(lora_b, lora_a, b)
            cut_scale = lora_scale(b, module.alpha, module.use_rslora)
            size_sq += update_frobenius_norm(cut_b, cut_a, cut_scale) ** 2
            change_sq += (
                difference_frobenius_norm(cut_b, cut_a, cut_scale, lora_b, lora_a, scale) ** 2
            )
        change = (change_sq / full_sq) ** 0.5 if full_sq > 0 else 0.0
        sizes.append(RankSize(rank=b, update_norm=size_sq**0.5, change_from_full=change))
    return sizes


def _compare(before: LoraModule, after: LoraModule, energy: float | None) -> ModuleRow:
    b1, a1 = before.factors(keep=False)
    b2, a2 = after.factors(keep=False)
    norm_before = update_frobenius_norm(b1, a1, before.scale)
    difference = difference_frobenius_norm(b2, a2, after.scale, b1, a1, before.scale)
    return ModuleRow(
        module=before.path,
        rank_before=before.r,
        rank_after=after.r,
        energy_kept=energy,
        relative_error=difference / norm_before if norm_before > 0 else 0.0,
        norm_before=norm_before,
        norm_after=update_frobenius_norm(b2, a2, after.scale),
    )
