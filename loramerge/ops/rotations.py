"""The orthogonal matrices of PEFT's OFT, BOFT and HRA tuners, built in float64 from their
saved parameters as PEFT 0.21.2 builds them (docs/rules.md section 6), and applied to the input
axis of a tile of weight rows.

A rotation of the inputs maps W (out x in) to W R^T; it mixes the columns of each row, never
the rows, so a tile of rows needs only its own rows.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def block_size_of(elements: int) -> int:
    """b with b (b - 1) / 2 = elements: the size of the skew blocks OFT stores as vectors."""
    size = (1 + math.isqrt(1 + 8 * elements)) // 2
    return size if size * (size - 1) // 2 == elements else 0


def skew_from_vectors(vectors: torch.Tensor, size: int) -> torch.Tensor:
    """(k, b(b-1)/2) upper-triangle entries, row by row -> (k, b, b) skew matrices Q - Q^T."""
    rows, cols = torch.triu_indices(size, size, 1)
    upper = torch.zeros(vectors.shape[0], size, size, dtype=F64)
    upper[:, rows, cols] = vectors.to(F64)
    return upper - upper.transpose(1, 2)


def constrain(skew: torch.Tensor, eps: float) -> torch.Tensor:
    """COFT: each skew block whose Frobenius norm exceeds eps / sqrt(blocks) is scaled down to
    that norm (PEFT projects the parameters so before every forward)."""
    radius = eps / math.sqrt(skew.shape[0])
    norms = torch.linalg.matrix_norm(skew).reshape(-1, 1, 1)
    return torch.where(norms <= radius, skew, skew * (radius / norms))


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """(I - Q)(I + Q)^-1 for each skew block Q: orthogonal."""
    eye = torch.eye(skew.shape[-1], dtype=F64).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated series for its Cayley rotation: I + 2 (Q + Q^2 + ... + Q^m) + Q^(m+1)
    with m = max(2, terms - 2) from three terms on; I + 2 Q for two terms, I for one. (The
    series approximates (I + Q)(I - Q)^-1, the transpose of `cayley`'s rotation.)"""
    result = torch.eye(skew.shape[-1], dtype=F64).repeat(skew.shape[0], 1, 1)
    if terms <= 1:
        return result
    result += 2 * skew
    if terms == 2:
        return result
    power = skew
    for _ in range(max(2, terms - 2) - 1):
        power = power @ skew
        result += 2 * power
    return result + power @ skew


def oft_blocks(
    vectors: torch.Tensor,
    blocks: int,
    *,
    neumann_terms: int | None,
    coft_eps: float | None = None,
) -> torch.Tensor:
    """OFT's rotation blocks (blocks, b, b) from `oft_R` (k, b(b-1)/2): k = blocks, or 1 shared
    by every block (block_share). `neumann_terms` None: the exact Cayley transform."""
    size = block_size_of(vectors.shape[1])
    skew = skew_from_vectors(vectors, size)
    if coft_eps is not None:
        skew = constrain(skew, coft_eps)
    rotation = cayley(skew) if neumann_terms is None else cayley_neumann(skew, neumann_terms)
    if rotation.shape[0] == 1 and blocks > 1:
        rotation = rotation.expand(blocks, size, size)
    return rotation.contiguous()


def boft_blocks(matrices: torch.Tensor) -> torch.Tensor:
    """BOFT's rotation blocks (factors, blocks, b, b) from `boft_R`: the Cayley transform of
    the skew part (R - R^T) / 2 of each stored block."""
    factors, blocks, size, _ = matrices.shape
    stored = matrices.to(F64).reshape(factors * blocks, size, size)
    skew = 0.5 * (stored - stored.transpose(1, 2))
    return cayley(skew).reshape(factors, blocks, size, size)


def butterfly_permutation(features: int, blocks: int, size: int, factor: int) -> torch.Tensor:
    """The permutation of butterfly factor `factor` (0 first) for `blocks` blocks of `size`:
    within each group of size * 2^factor inputs, the chunks of size / 2 at even positions come
    first, then those at odd positions. p[i] is the input that position i takes."""
    group = size * 2**factor
    half = size // 2
    chunks = group // half
    order = [*range(0, chunks, 2), *range(1, chunks, 2)]
    within = torch.cat([torch.arange(c * half, (c + 1) * half) for c in order])
    starts = torch.arange(0, features, group).reshape(-1, 1)
    return (starts + within.reshape(1, -1)).reshape(-1)


def butterfly_permutations(features: int, factors: int, blocks: int, size: int) -> torch.Tensor:
    """(factors, features): the permutation of each butterfly factor (identity with one)."""
    if factors == 1:
        return torch.arange(features).reshape(1, -1)
    return torch.stack([butterfly_permutation(features, blocks, size, f) for f in range(factors)])


def rotate_inputs(rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """rows (n x in) times the block-diagonal R^T: each run of b inputs x becomes R_k x."""
    count, size = blocks.shape[0], blocks.shape[-1]
    split = rows.reshape(rows.shape[0], count, size)
    return torch.einsum("nkj,kcj->nkc", split, blocks).reshape(rows.shape[0], -1)


def butterfly_inputs(
    rows: torch.Tensor, blocks: torch.Tensor, permutations: torch.Tensor
) -> torch.Tensor:
    """rows (n x in) times M^T, M = B_(F-1) ... B_0 with B_f = P_f D_f P_f^T, D_f the block
    diagonal of blocks[f] and P_f the permutation matrix with P_f[i, p_f[i]] = 1."""
    for blocks_f, permutation in zip(blocks, permutations, strict=True):
        identity = bool((permutation == torch.arange(permutation.numel())).all())
        inverse = torch.argsort(permutation)
        moved = rows if identity else rows[:, inverse]
        moved = rotate_inputs(moved, blocks_f)
        rows = moved if identity else moved[:, permutation]
    return rows


def householder_vectors(vectors: torch.Tensor, orthonormal: bool) -> torch.Tensor:
    """HRA's unit vectors (in x r) from `hra_u`: each column normalised, or (apply_GS) made
    orthonormal by Gram-Schmidt in column order, each column minus its projections on the
    earlier results one at a time."""
    columns = vectors.to(F64)
    if not orthonormal:
        return columns / torch.linalg.vector_norm(columns, dim=0)
    done: list[torch.Tensor] = []
    for i in range(columns.shape[1]):
        u = columns[:, i]
        for q in done:
            u = u - (q @ u) * q
        done.append(u / torch.linalg.vector_norm(u))
    return torch.stack(done, dim=1)


def reflect_inputs(rows: torch.Tensor, units: torch.Tensor, orthonormal: bool) -> torch.Tensor:
    """rows (n x in) times H_1 ... H_r, H_i = I - 2 u_i u_i^T; with orthonormal vectors PEFT
    forms the one matrix I - 2 U U^T instead."""
    if orthonormal:
        return rows - 2 * (rows @ units) @ units.T
    for i in range(units.shape[1]):
        u = units[:, i : i + 1]
        rows = rows - 2 * (rows @ u) @ u.T
    return rows
