"""Low-rank math on LoRA factors via the QR core: spectra, norms, optimal rank reduction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loramerge.errors import (
    LoramergeError,
    OptionError,
    ShapeMismatchError,
    unmeasurable_factors,
)

# Notation (docs/rules.md section 3): A is (r x in), B is (out x r), the update is dW = s * B @ A.
# Nothing here ever forms an out x in matrix; every function costs O((in + out) r^2).

_COMPUTE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class LowRankCore:
    """dW = Qb @ core @ Qa.T, with orthonormal columns in Qb and Qa (scale folded into `core`).

    Qb is (out x p) and Qa is (in x q) with p = min(r, out), q = min(r, in) (reduced QR), and
    `core` = s * Rb @ Ra.T is (p x q); so p = q = r in the usual case r <= min(out, in), and all
    three are empty when r = 0. All tensors are in the compute dtype (float64 by default).
    """

    Qb: torch.Tensor
    Qa: torch.Tensor
    core: torch.Tensor

    def singular_values(self) -> torch.Tensor:
        """Singular values of dW, descending: 1-D of length min(r, out, in), compute dtype."""
        return torch.linalg.svdvals(self.core)


@dataclass(frozen=True, eq=False)
class Reduction:
    """Result of `svd_reduce`: B @ A is the best rank-`rank` approximation of the input update.

    B is (out x rank) and A is (rank x in) in the requested output dtype, with the scale folded
    in and split as sqrt(S) on both sides, so the reduced LoRA has r = lora_alpha = rank (scale
    1). `singular_values` holds all singular values of the original update (1-D, descending,
    compute dtype). `energy_kept` = sum_{i<rank} S_i^2 / sum S_i^2 (1.0 for a zero update) and
    `relative_error` = ||dW - B @ A||_F / ||dW||_F (0.0 for a zero update).
    """

    B: torch.Tensor
    A: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    energy_kept: float
    relative_error: float


def as_matrix_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten conv-style factors to the 2-D (out x r) and (r x in') that every function takes.

    Conv2d LoRA stores A as (r, in, kh, kw) and B as (out, r, 1, 1); its update is
    s * (B.reshape(out, r) @ A.reshape(r, in * kh * kw)).reshape(out, in, kh, kw), so
    (out x r) and (r x in*kh*kw) is an exact matrix view (likewise for Conv1d/Conv3d). 2-D
    factors come back unchanged; the dtype is never changed. To turn reduced factors back into
    conv factors use `as_conv_factors`.
    """
    if B.ndim < 2 or A.ndim < 2:
        raise ShapeMismatchError(
            f"LoRA factors must have at least 2 dimensions, got B {tuple(B.shape)} and "
            f"A {tuple(A.shape)}"
        )
    if any(size != 1 for size in B.shape[2:]):
        raise ShapeMismatchError(
            f"conv LoRA B must be (out, r, 1, ..., 1), got {tuple(B.shape)}",
            hint="only 1x1 up-projections are a plain low-rank update",
        )
    return B.reshape(B.shape[0], B.shape[1]), A.reshape(A.shape[0], -1)


def as_conv_factors(
    B: torch.Tensor, A: torch.Tensor, kernel_shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `as_matrix_factors`: reshape 2-D factors back to conv factors.

    B (out x k) becomes (out, k, 1, ..., 1) and A (k x in * prod(kernel_shape)) becomes
    (k, in, *kernel_shape), e.g. kernel_shape = (kh, kw) for Conv2d. The dtype is unchanged.
    """
    kernel = tuple(int(size) for size in kernel_shape)
    ones = (1,) * len(kernel)
    return B.reshape(B.shape[0], B.shape[1], *ones), A.reshape(A.shape[0], -1, *kernel)


def qr_core(
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float = 1.0,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> LowRankCore:
    """QR core of dW = scale * B @ A: B = Qb Rb, A.T = Qa Ra, core = scale * Rb @ Ra.T.

    B is (out x r), A is (r x in), any floating dtype (upcast to `compute_dtype`, float64 by
    default, or float32). See `LowRankCore` for the output shapes, including r > out or r > in
    (fewer QR columns) and r = 0 (empty core).
    """
    b, a = _prepare(B, A, compute_dtype)
    scale = _check_scale(scale)
    Qb, Rb = torch.linalg.qr(b, mode="reduced")
    Qa, Ra = torch.linalg.qr(a.T, mode="reduced")
    return LowRankCore(Qb=Qb, Qa=Qa, core=scale * (Rb @ Ra.T))


def update_singular_values(
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Singular values of scale * B @ A (B: out x r, A: r x in), descending.

    Returns a 1-D tensor of length min(r, out, in) in `compute_dtype` (float64 by default): the
    remaining singular values of the out x in update are exactly zero.
    """
    return qr_core(B, A, scale, compute_dtype=compute_dtype).singular_values()


def update_frobenius_norm(
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> float:
    """||scale * B @ A||_F for B (out x r) and A (r x in); equals ||core||_F (orthonormal Q).

    The core is formed as `qr_core` forms it, from the R factors alone: the Q factors, which
    the norm does not need, took more than half the time.
    """
    b, a = _prepare(B, A, compute_dtype)
    scale = _check_scale(scale)
    Rb = torch.linalg.qr(b, mode="r").R
    Ra = torch.linalg.qr(a.T, mode="r").R
    return float(torch.linalg.matrix_norm(scale * (Rb @ Ra.T)))


def concat_factors(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    *,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [(B_j, A_j, s_j)] into one LoRA (B', A') with B' @ A' = sum_j s_j B_j A_j (scale 1).

    B_j is (out x r_j) and A_j is (r_j x in); B' = [B_1, ..., B_T] is (out x sum r_j) and
    A' = [s_1 A_1; ...; s_T A_T] is (sum r_j x in), both in `dtype` (float32 by default; the
    scales are applied in `compute_dtype`, so pass dtype=torch.float64 for an exact result).
    Used by COLA folding and the ResLoRA block-shortcut merge; r_j = 0 entries are allowed.
    """
    if not pairs:
        raise OptionError("concat_factors needs at least one (B, A, scale) triple")
    Bs: list[torch.Tensor] = []
    As: list[torch.Tensor] = []
    for index, (B, A, scale) in enumerate(pairs):
        b, a = _prepare(B, A, compute_dtype)
        if Bs and (b.shape[0] != Bs[0].shape[0] or a.shape[1] != As[0].shape[1]):
            raise ShapeMismatchError(
                f"factor pair {index} has update shape ({b.shape[0]} x {a.shape[1]}), expected "
                f"({Bs[0].shape[0]} x {As[0].shape[1]}) like pair 0"
            )
        Bs.append(b)
        As.append(_check_scale(scale) * a)
    return torch.cat(Bs, dim=1).to(dtype), torch.cat(As, dim=0).to(dtype)


def difference_frobenius_norm(
    B1: torch.Tensor,
    A1: torch.Tensor,
    s1: float,
    B2: torch.Tensor,
    A2: torch.Tensor,
    s2: float,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> float:
    """||s1 B1 @ A1 - s2 B2 @ A2||_F without forming either out x in matrix.

    B1 (out x r1), A1 (r1 x in), B2 (out x r2), A2 (r2 x in); r1 and r2 may differ. The norm is
    that of the QR core of B = [B1, B2] with A = [s1 A1; -s2 A2], in `compute_dtype`.
    """
    B, A = concat_factors(
        [(B1, A1, s1), (B2, A2, -_check_scale(s2))],
        dtype=compute_dtype,
        compute_dtype=compute_dtype,
    )
    return float(torch.linalg.matrix_norm(qr_core(B, A, compute_dtype=compute_dtype).core))


def svd_reduce(
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float64,
) -> Reduction:
    """Best rank-`rank` approximation (Frobenius, Eckart-Young) of scale * B @ A as new factors.

    B is (out x r), A is (r x in), any floating dtype. Returns B' (out x rank) and A'
    (rank x in) in `dtype` with B' @ A' = Qb U_k S_k V_k^T Qa^T, split as B' = Qb U_k sqrt(S_k)
    and A' = sqrt(S_k) V_k^T Qa^T (docs/rules.md section 3), to be written with
    r = lora_alpha = rank.
    When `rank` exceeds min(r, out, in), the number of singular values there are, B' and A' are
    padded with zero columns / rows so that the output rank is exactly `rank`; singular values
    that are zero inside that range give zero (or round-off sized) factors as well.
    """
    return reduce_core(qr_core(B, A, scale, compute_dtype=compute_dtype), rank, dtype=dtype)


def reduce_core(core: LowRankCore, rank: int, *, dtype: torch.dtype = torch.float32) -> Reduction:
    """`svd_reduce` starting from an existing `LowRankCore`; same outputs and padding rule.

    Lets a caller choose the rank from `core.singular_values()` (with
    `rank_choice.rank_for_energy`) and then reduce without repeating the QR factorisations.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise OptionError(f"target rank must be an integer >= 1, got {rank!r}")
    U, S, Vh = torch.linalg.svd(core.core, full_matrices=False)
    kept = min(rank, S.shape[0])
    root = S[:kept].sqrt()
    new_B = (core.Qb @ U[:, :kept]) * root
    new_A = root[:, None] * (Vh[:kept] @ core.Qa.T)
    if kept < rank:
        new_B = torch.cat([new_B, new_B.new_zeros(new_B.shape[0], rank - kept)], dim=1)
        new_A = torch.cat([new_A, new_A.new_zeros(rank - kept, new_A.shape[1])], dim=0)
    energy, error = _energy_and_error(S, kept)
    return Reduction(
        B=new_B.to(dtype),
        A=new_A.to(dtype),
        singular_values=S,
        rank=rank,
        energy_kept=energy,
        relative_error=error,
    )


def _energy_and_error(S: torch.Tensor, kept: int) -> tuple[float, float]:
    """Retained energy and relative Frobenius error of keeping the top `kept` of S (descending).

    The error comes from the tail sum itself, not from 1 - energy, which would cancel.
    """
    top = float(S.max()) if S.numel() else 0.0
    if top == 0.0:
        return 1.0, 0.0
    squares = (S.to(torch.float64) / top) ** 2  # normalised: no overflow or underflow
    total = float(squares.sum())
    tail = float(squares[kept:].sum())
    return float(squares[:kept].sum()) / total, (tail / total) ** 0.5


def _check_scale(scale: float) -> float:
    value = float(scale)
    if value != value or value in (float("inf"), float("-inf")):
        raise LoramergeError(f"LoRA scale must be finite, got {scale!r}")
    return value


def _prepare(
    B: torch.Tensor, A: torch.Tensor, compute_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check 2-D, consistent, finite, floating factors and upcast them to the compute dtype."""
    if compute_dtype not in _COMPUTE_DTYPES:
        raise OptionError(f"compute dtype must be float32 or float64, got {compute_dtype}")
    if B.ndim != 2 or A.ndim != 2:
        raise ShapeMismatchError(
            f"expected 2-D factors B (out x r) and A (r x in), got B {tuple(B.shape)} and "
            f"A {tuple(A.shape)}",
            hint="flatten conv factors with as_matrix_factors first",
        )
    if B.shape[1] != A.shape[0]:
        raise ShapeMismatchError(
            f"rank mismatch: B {tuple(B.shape)} has {B.shape[1]} columns but A "
            f"{tuple(A.shape)} has {A.shape[0]} rows"
        )
    if not (B.is_floating_point() and A.is_floating_point()):
        raise LoramergeError(f"LoRA factors must be floating point, got {B.dtype} and {A.dtype}")
    b, a = B.to(compute_dtype), A.to(compute_dtype)
    if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())):
        raise unmeasurable_factors()
    return b, a
