"""Exact plain-LoRA forms of structured updates: Hadamard (LoHa), Kronecker (LoKr), Tucker cores
and dense matrices, as factors B (out x k) and A (k x in) with B @ A equal to the update."""

from __future__ import annotations

import torch

from loramerge.errors import ShapeMismatchError
from loramerge.ops.lowrank import qr_core, reduce_core
from loramerge.ops.rank_choice import numerical_rank

# Every function here is pure: tensors in, tensors out, no paths or modules. Products of two
# float32 (or lower precision) numbers are exact in float64, so the factors built from products
# (Khatri-Rao, Kronecker) are computed in float64 and rounded once by the caller if it wants.


def hadamard_factors(
    b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = (b1 @ a1) * (b2 @ a2) (elementwise), exactly.

    b1 (out x r1), a1 (r1 x in), b2 (out x r2), a2 (r2 x in). Row o of B is the Kronecker
    product of row o of b1 and row o of b2 (the face-splitting product), column i of A that of
    column i of a1 and column i of a2 (the Khatri-Rao product): B is (out x r1*r2) and A is
    (r1*r2 x in), since sum_{p,q} b1[o,p] b2[o,q] a1[p,i] a2[q,i] = (b1 a1)[o,i] (b2 a2)[o,i].
    Returned in float64.
    """
    _check_pair(b1, a1, "first")
    _check_pair(b2, a2, "second")
    if b1.shape[0] != b2.shape[0] or a1.shape[1] != a2.shape[1]:
        raise ShapeMismatchError(
            f"Hadamard factors make updates of different shapes: "
            f"({b1.shape[0]} x {a1.shape[1]}) and ({b2.shape[0]} x {a2.shape[1]})"
        )
    b1, a1, b2, a2 = (t.to(torch.float64) for t in (b1, a1, b2, a2))
    out, inp = b1.shape[0], a1.shape[1]
    b = (b1[:, :, None] * b2[:, None, :]).reshape(out, -1)
    a = (a1[:, None, :] * a2[None, :, :]).reshape(-1, inp)
    return b, a


def kronecker_factors(
    b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = kron(b1 @ a1, b2 @ a2), exactly (the mixed-product property).

    b1 (m x r1), a1 (r1 x n), b2 (p x r2), a2 (r2 x q): B = kron(b1, b2) is (m*p x r1*r2) and
    A = kron(a1, a2) is (r1*r2 x n*q). Returned in float64.
    """
    _check_pair(b1, a1, "first")
    _check_pair(b2, a2, "second")
    b1, a1, b2, a2 = (t.to(torch.float64) for t in (b1, a1, b2, a2))
    return kron(b1, b2), kron(a1, a2)


def kron(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Kronecker product of two matrices, (m x n) and (p x q) giving (m*p x n*q) with
    result[i*p + k, j*q + l] = left[i, j] * right[k, l]. Unlike torch.kron (2.13), it accepts
    views of any strides, such as slices of SVD factors."""
    m, n = left.shape
    p, q = right.shape
    return (left[:, None, :, None] * right[None, :, None, :]).reshape(m * p, n * q)


def face_splitting(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: left (n x p) and right (n x q) give (n x p*q) whose row i is
    kron(left[i], right[i]); B of `hadamard_factors` alone (A is face_splitting(a1.T, a2.T).T).
    """
    if left.ndim != 2 or right.ndim != 2 or left.shape[0] != right.shape[0]:
        raise ShapeMismatchError(
            f"face-splitting needs two matrices with the same number of rows, got "
            f"{tuple(left.shape)} and {tuple(right.shape)}"
        )
    return (left[:, :, None] * right[:, None, :]).reshape(left.shape[0], -1)


def tucker_down(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The core contracted with a down projection: out[a, i, *k] = sum_b core[a, b, *k] down[b, i].

    core (r1, r2, *kernel), down (r2, in): returns (r1, in, *kernel) in float64. With an up
    projection U (out x r1), U @ out.reshape(r1, -1) is the Tucker-2 update sum_{a,b}
    U[o, a] core[a, b, *k] down[b, i] as a conv LoRA of rank r1.
    """
    if core.ndim < 2 or down.ndim != 2 or core.shape[1] != down.shape[0]:
        raise ShapeMismatchError(
            f"a Tucker core {tuple(core.shape)} does not meet a down projection "
            f"{tuple(down.shape)} (its second axis must equal the projection's rows)"
        )
    core, down = core.to(torch.float64), down.to(torch.float64)
    kernel = core.shape[2:]
    flat = core.reshape(core.shape[0], core.shape[1], -1)  # (r1, r2, K)
    result = torch.einsum("abk,bi->aik", flat, down)
    return result.reshape(core.shape[0], down.shape[1], *kernel)


def exact_factors(
    matrix: torch.Tensor, rtol: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = matrix and k = its numerical rank (see rank_choice.numerical_rank).

    matrix (m x n), any floating dtype; B = U_k S_k (m x k), A = V_k^T (k x n), float64. The
    singular values dropped are below rtol * S_0, i.e. round-off of a matrix of rank k. A zero
    matrix gives k = 1 with zero factors (a LoRA has at least one rank).
    """
    if matrix.ndim != 2:
        raise ShapeMismatchError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    k = max(numerical_rank(s, rtol), 1)
    return u[:, :k] * s[:k], vh[:k]


def _check_pair(b: torch.Tensor, a: torch.Tensor, which: str) -> None:
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ShapeMismatchError(
            f"the {which} factor pair is not (out x r) and (r x in): "
            f"{tuple(b.shape)} and {tuple(a.shape)}"
        )


def minimal_factors(
    b: torch.Tensor, a: torch.Tensor, rtol: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B' @ A' = b @ a at its numerical rank k, via the QR core (the out x in
    product is never formed); singular values split as sqrt(S) on both sides, float64.

    b (out x r), a (r x in). Unlike `exact_factors`, k may be 0: a zero product gives
    (out x 0) and (0 x in), so that a caller can tell an update that changes nothing.
    """
    _check_pair(b, a, "only")
    core = qr_core(b, a)
    k = numerical_rank(core.singular_values(), rtol)
    if k == 0:
        return b.new_zeros(b.shape[0], 0, dtype=torch.float64), a.new_zeros(
            0, a.shape[1], dtype=torch.float64
        )
    reduced = reduce_core(core, k, dtype=torch.float64)
    return reduced.B, reduced.A


def precision_rtol(dtype: torch.dtype, size: int) -> float:
    """The numerical-rank threshold for values stored in `dtype`: 16 * size * eps(dtype).

    Stored numbers are exact only to their own precision: singular values below this share of
    the largest are the rounding of the stored values, not structure."""
    finfo = torch.finfo(dtype if dtype.is_floating_point else torch.float32)
    return 16 * max(size, 1) * finfo.eps
