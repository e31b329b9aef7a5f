"""Exact plain-LoRA forms of structured updates: Hadamard products (LoHa), Kronecker products
(LoKr), and the minimal exact factors of a low-rank product or a full matrix.

Notation as in ops/lowrank.py: a LoRA pair is B (out x r) and A (r x in) with update B @ A.
Every function here is exact in exact arithmetic; the only rounding is that of the compute
dtype (float64 by default), and `minimal_factors` / `matrix_factors` drop singular values below
the numerical-rank threshold of `rank_choice.numerical_rank`, i.e. round-off of the stored
values, never an energy that matters.
"""

from __future__ import annotations

import torch

from loramerge.errors import ShapeMismatchError
from loramerge.ops.lowrank import qr_core, reduce_core
from loramerge.ops.rank_choice import numerical_rank


def face_splitting(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: row i of the result is kron(left[i], right[i]).

    left (n x p) and right (n x q) give (n x p*q). This is the face-splitting product; its
    transpose applied to columns is the Khatri-Rao product.
    """
    if left.ndim != 2 or right.ndim != 2 or left.shape[0] != right.shape[0]:
        raise ShapeMismatchError(
            f"face-splitting needs two matrices with the same number of rows, got "
            f"{tuple(left.shape)} and {tuple(right.shape)}"
        )
    rows = left.shape[0]
    return (left[:, :, None] * right[:, None, :]).reshape(rows, -1)


def hadamard_factors(
    b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B1 @ A1) * (B2 @ A2) (elementwise) as one LoRA pair of rank r1 * r2, exactly.

    (B1 A1)[i, j] (B2 A2)[i, j] = sum_{p, q} B1[i, p] B2[i, q] A1[p, j] A2[q, j], so
    B = face_splitting(B1, B2) (out x r1 r2) and A = face_splitting(A1^T, A2^T)^T (r1 r2 x in).
    """
    _check_pair(b1, a1)
    _check_pair(b2, a2)
    if b1.shape[0] != b2.shape[0] or a1.shape[1] != a2.shape[1]:
        raise ShapeMismatchError(
            f"Hadamard factors of different shapes: ({b1.shape[0]} x {a1.shape[1]}) and "
            f"({b2.shape[0]} x {a2.shape[1]})"
        )
    return face_splitting(b1, b2), face_splitting(a1.T, a2.T).T


def kron(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Kronecker product of two matrices: (m x n) and (p x q) give (m p x n q) with
    result[i p + k, j q + l] = left[i, j] right[k, l] (any strides)."""
    m, n = left.shape
    p, q = right.shape
    return (left[:, None, :, None] * right[None, :, None, :]).reshape(m * p, n * q)


def kronecker_factors(
    b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """kron(B1 @ A1, B2 @ A2) as one LoRA pair of rank r1 * r2, exactly (mixed-product rule:
    kron(B1 A1, B2 A2) = kron(B1, B2) @ kron(A1, A2)). B1 A1 is (a x c), B2 A2 is (b x d);
    the result is (a b x c d)."""
    _check_pair(b1, a1)
    _check_pair(b2, a2)
    return kron(b1, b2), kron(a1, a2)


def minimal_factors(
    b: torch.Tensor,
    a: torch.Tensor,
    *,
    rtol: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B @ A refactored at its numerical rank k: B' (out x k), A' (k x in), B' A' = B A.

    Via the QR core (never the out x in product); the singular values are split as sqrt(S) on
    both sides. k may be 0 (a zero product): then B' is (out x 0) and A' is (0 x in). Results
    are in `compute_dtype`.
    """
    _check_pair(b, a)
    core = qr_core(b, a, compute_dtype=compute_dtype)
    k = numerical_rank(core.singular_values(), rtol)
    if k == 0:
        return b.new_zeros(b.shape[0], 0, dtype=compute_dtype), a.new_zeros(
            0, a.shape[1], dtype=compute_dtype
        )
    reduced = reduce_core(core, k, dtype=compute_dtype)
    return reduced.B, reduced.A


def matrix_factors(
    matrix: torch.Tensor,
    *,
    rtol: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix W (m x n) as exact factors at its numerical rank k: W = B A with B (m x k)
    and A (k x n), from the SVD W = U S V^T as B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T."""
    if matrix.ndim != 2:
        raise ShapeMismatchError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    w = matrix.to(compute_dtype)
    if 0 in w.shape:
        return w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1])
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = numerical_rank(s, rtol)
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def precision_rtol(dtype: torch.dtype, size: int) -> float:
    """The numerical-rank threshold for values stored in `dtype`: 16 * size * eps(dtype).

    Stored values are exact only to their own precision; singular values below this share of
    the largest are rounding of the stored numbers, not structure."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return 16 * max(size, 1) * eps


def _check_pair(b: torch.Tensor, a: torch.Tensor) -> None:
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ShapeMismatchError(
            f"expected factors B (out x r) and A (r x in), got {tuple(b.shape)} and "
            f"{tuple(a.shape)}"
        )
