"""COLA folding math (docs/rules.md section 5): a chain of plain LoRAs as one exact or reduced LoRA.

A chain L_1..L_T with updates s_j B_j A_j sums to one LoRA by concatenation,
A' = [s_1 A_1; ...; s_T A_T], B' = [B_1, ..., B_T], written with r = lora_alpha = sum r_j (scale
1); a module a link does not touch contributes a zero term. With a target rank the concatenation
is compressed by the QR-core SVD (docs/rules.md section 3), and the energy kept is reported. Nothing
here forms an out x in matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule
from loramerge.errors import OptionError, located
from loramerge.ops.cola_links import Link, chain_paths, folded_adapter, folded_module, members
from loramerge.ops.lowrank import Reduction, concat_factors, svd_reduce, update_frobenius_norm

Term = tuple[torch.Tensor, torch.Tensor, float]  # (B (out x r), A (r x in), scale)


def reduce_terms(
    terms: Sequence[Term], rank: int, *, dtype: torch.dtype = torch.float32
) -> Reduction:
    """The best rank-k approximation of sum_j s_j B_j A_j, k = min(rank, sum r_j, out, in).

    The concatenation is formed in float64 and reduced through its QR core; the result has
    scale 1 (r = lora_alpha = k) and reports the energy kept.
    """
    lora_b, lora_a = concat_factors(terms, dtype=torch.float64)
    k = min(rank, lora_b.shape[1], lora_b.shape[0], lora_a.shape[1])
    return svd_reduce(lora_b, lora_a, 1.0, max(k, 1), dtype=dtype)


def module_terms(module: LoraModule, weight: float = 1.0) -> Term:
    """(B, A, s * weight) of one module as float32 matrices (conv factors flattened); factors
    not loaded yet are read, not kept, so that memory does not grow with the chain."""
    lora_b, lora_a = module.factors(keep=False)
    return lora_b, lora_a, module.scale * weight


def update_norm(module: LoraModule, weight: float = 1.0) -> float:
    """||weight * s B A||_F, from the QR core in float64."""
    return update_frobenius_norm(*module_terms(module, weight))


def chain_update_norm(modules: Sequence[tuple[LoraModule, float]]) -> float:
    """||sum_j w_j s_j B_j A_j||_F of one module across the links that touch it, in float64."""
    terms = [module_terms(module, weight) for module, weight in modules]
    lora_b, lora_a = concat_factors(terms, dtype=torch.float64)
    return update_frobenius_norm(lora_b, lora_a, 1.0)


@dataclass(frozen=True)
class ModuleFold:
    """How one module of the folded adapter was made."""

    module: str
    link_ranks: tuple[int, ...]  # per link, 0 where the link does not touch the module
    rank: int  # the rank written
    energy_kept: float = 1.0  # sum of kept S_i^2 / sum of all S_i^2; 1.0 when exact
    relative_error: float = 0.0  # ||dW - dW_k||_F / ||dW||_F
    total_energy: float = 0.0  # ||dW||_F^2, to weigh modules in an overall energy


@dataclass
class FoldedAdapter:
    adapter: Adapter
    modules: dict[str, ModuleFold]

    @property
    def energy_kept(self) -> float:
        """Energy kept over all modules (each weighted by its update's squared norm)."""
        total = sum(m.total_energy for m in self.modules.values())
        if total == 0.0:
            return 1.0
        return sum(m.energy_kept * m.total_energy for m in self.modules.values()) / total


def fold_chain(
    links: Sequence[Link],
    *,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    measure: bool = True,
) -> FoldedAdapter:
    """Fold (adapter, weight) links, in chain order, into one plain LoRA adapter.

    Exact by concatenation when `rank` is None, else each module reduced to at most `rank`.
    `measure=False` skips the exact fold's energies (`total_energy` stays 0.0), which a fold
    into the base does not report: they cost a QR of every module.
    Every module gets r = lora_alpha = its rank (scale 1, no rsLoRA); LoRA biases add up as
    sum_j w_j s_j b_j. Links must be plain LoRA (no DoRA magnitude, no modules_to_save): the
    caller checks that, since only plain updates add up.
    """
    if not links:
        raise OptionError("a chain needs at least one link")
    modules: dict[str, LoraModule] = {}
    report: dict[str, ModuleFold] = {}
    for path in chain_paths(links):
        found = members(links, path)
        terms = [module_terms(module, weight) for _, module, weight in found]
        link_ranks = tuple(
            adapter.modules[path].r if path in adapter.modules else 0 for adapter, _ in links
        )
        with located(module=path):
            folded, lora_b, lora_a = _fold_module(path, terms, link_ranks, rank, dtype, measure)
        module = found[0][1].with_factors(lora_b, lora_a, float(lora_a.shape[0]))
        modules[path] = folded_module(module, found, _folded_bias(found, dtype))
        report[path] = folded
    return FoldedAdapter(folded_adapter(links, modules), report)


def _folded_bias(
    members: Sequence[tuple[int, LoraModule, float]], dtype: torch.dtype
) -> LazyTensor | None:
    biased = [(m, w) for _, m, w in members if m.bias is not None]
    if not biased:
        return None
    total = torch.zeros(members[0][1].lora_B.shape[0], dtype=torch.float64)
    for module, weight in biased:
        assert module.bias is not None
        total += module.bias.load().to(torch.float64).reshape(-1) * (module.scale * weight)
    return LazyTensor.of(total.to(dtype))


def _fold_module(
    path: str,
    terms: Sequence[Term],
    link_ranks: tuple[int, ...],
    rank: int | None,
    dtype: torch.dtype,
    measure: bool = True,
) -> tuple[ModuleFold, torch.Tensor, torch.Tensor]:
    """One module's folded factors: the exact concatenation, or its best rank-`rank` form."""
    if rank is None:
        exact_b, exact_a = concat_factors(terms, dtype=torch.float64)
        # the exact concatenation: the scales are applied in float64, then cast
        lora_b, lora_a = exact_b.to(dtype), exact_a.to(dtype)
        energy = update_frobenius_norm(exact_b, exact_a, 1.0) ** 2 if measure else 0.0
        return ModuleFold(path, link_ranks, lora_a.shape[0], total_energy=energy), lora_b, lora_a
    reduction = reduce_terms(terms, rank, dtype=dtype)
    energy = float((reduction.singular_values.to(torch.float64) ** 2).sum())
    folded = ModuleFold(
        path,
        link_ranks,
        reduction.rank,
        reduction.energy_kept,
        reduction.relative_error,
        energy,
    )
    return folded, reduction.B, reduction.A
