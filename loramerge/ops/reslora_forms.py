"""How a merged ResLoRA block's plain factors are formed from its chain's original factors
(docs/rules.md section 4), and those factors made ready to write.

A rule decides a `BlockForm` per block: which blocks' factors are stacked, what multiplies B,
and which earlier A's are added to A. The form holds numbers only, so a conversion keeps the
forms of a whole adapter and forms each block's factors when they are read: memory grows
neither with the adapter nor with the ranks that stacking produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loramerge.errors import OptionError, ShapeMismatchError
from loramerge.ops.lowrank import svd_reduce

Factors = tuple[torch.Tensor, torch.Tensor]  # (B, A)


@dataclass(frozen=True)
class BlockForm:
    """Block n's plain factors in terms of the chain's original (B_j, A_j):
    B' = b_scale * [B_j for j in stacked] and A' = [A_j; ...] for j in stacked, then
    A' + sum c A_j over `a_terms` (the A-merge, where `stacked` is (n,))."""

    stacked: tuple[int, ...]
    b_scale: float = 1.0
    a_terms: tuple[tuple[int, float], ...] = ()

    def rank(self, block_rank: int) -> int:
        """The plain rank, given the rank of one original block."""
        return len(self.stacked) * block_rank

    def factors(self, chain: Sequence[Factors]) -> Factors:
        """(B', A') from `chain`, which may form each (B_j, A_j) when it is indexed."""
        if len(self.stacked) == 1:
            B, A = chain[self.stacked[0]]
        else:
            pairs = [chain[j] for j in self.stacked]
            B = torch.cat([b for b, _ in pairs], dim=1)
            A = torch.cat([a for _, a in pairs], dim=0)
        if self.b_scale != 1.0:
            B = self.b_scale * B
        return B, self._a_merged(A, chain) if self.a_terms else A

    def _a_merged(self, A: torch.Tensor, chain: Sequence[Factors]) -> torch.Tensor:
        """A + sum c A_j, always from the chain's original A's."""
        merged = A.clone()
        for j, c in self.a_terms:
            previous = chain[j][1]
            if previous.shape != merged.shape:
                raise ShapeMismatchError(
                    f"A-merge needs equal A shapes, block {j} has {tuple(previous.shape)} and "
                    f"block {self.stacked[0]} {tuple(merged.shape)}"
                )
            merged = merged + c * previous
        return merged


@dataclass(frozen=True, eq=False)
class PlainFactors:
    """Factors ready to write: B (out x r), A (r x in), float32, with their r and alpha."""

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    alpha: float
    energy_kept: float = 1.0
    relative_error: float = 0.0


def plain_size(
    form_rank: int,
    lora_alpha: float,
    lora_rank: int,
    *,
    rank: int | None = None,
    pad_to: int | None = None,
) -> tuple[int, float]:
    """(r, alpha) a block of plain rank `form_rank` is written with: reduced to `rank`, r = alpha
    = rank (the scale folded in); else its own rank, or `pad_to` where that is larger, with
    alpha = lora_alpha * r / lora_rank so that alpha / r stays the checkpoint's scale (r is a
    multiple of the checkpoint's rank, so integer alphas stay integers)."""
    if rank is not None and pad_to is not None:
        raise OptionError("choose either a target rank or padding to a uniform rank, not both")
    if rank is not None:
        return rank, float(rank)
    r = max(form_rank, pad_to or 0)
    return r, lora_alpha * r / lora_rank


def plain_factors(
    factors: Factors,
    scale: float,
    lora_alpha: float,
    lora_rank: int,
    *,
    rank: int | None = None,
    pad_to: int | None = None,
) -> PlainFactors:
    """A block's formed factors (dW = scale * B @ A) as float32 factors to write: exact at
    their own rank, zero-padded to `pad_to` (exact), or reduced to `rank` by the QR-core SVD
    (lossy, the energy kept reported); r and alpha as `plain_size` gives them."""
    B, A = factors
    r, alpha = plain_size(A.shape[0], lora_alpha, lora_rank, rank=rank, pad_to=pad_to)
    if rank is not None:
        reduced = svd_reduce(B, A, scale, rank, dtype=torch.float32)
        return PlainFactors(
            reduced.B, reduced.A, r, alpha, reduced.energy_kept, reduced.relative_error
        )
    B, A = B.to(torch.float32), A.to(torch.float32)
    if r > A.shape[0]:
        B = torch.cat([B, B.new_zeros(B.shape[0], r - A.shape[0])], dim=1)
        A = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])], dim=0)
    return PlainFactors(B, A, r, alpha)
