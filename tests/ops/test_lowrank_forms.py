"""Exact LoRA forms of Hadamard and Kronecker products, and minimal exact factors."""

from __future__ import annotations

import pytest
import torch

from loramerge.errors import ShapeMismatchError
from loramerge.ops.lowrank_forms import (
    face_splitting,
    hadamard_factors,
    kron,
    kronecker_factors,
    matrix_factors,
    minimal_factors,
    precision_rtol,
)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_face_splitting_rows_are_kronecker_products():
    left, right = _rand(5, 3, seed=0), _rand(5, 4, seed=1)
    out = face_splitting(left, right)
    assert out.shape == (5, 12)
    for i in range(5):
        assert torch.equal(out[i], torch.kron(left[i], right[i]))


@pytest.mark.parametrize(("r1", "r2"), [(1, 1), (2, 3), (4, 4)])
def test_hadamard_of_two_lowrank_products_is_one_lora(r1, r2):
    b1, a1 = _rand(7, r1, seed=2), _rand(r1, 9, seed=3)
    b2, a2 = _rand(7, r2, seed=4), _rand(r2, 9, seed=5)
    b, a = hadamard_factors(b1, a1, b2, a2)
    assert b.shape == (7, r1 * r2) and a.shape == (r1 * r2, 9)
    torch.testing.assert_close(b @ a, (b1 @ a1) * (b2 @ a2), rtol=1e-12, atol=1e-12)


def test_kronecker_of_two_lowrank_products_is_one_lora():
    b1, a1 = _rand(3, 2, seed=6), _rand(2, 4, seed=7)
    b2, a2 = _rand(5, 1, seed=8), _rand(1, 6, seed=9)
    b, a = kronecker_factors(b1, a1, b2, a2)
    assert b.shape == (15, 2) and a.shape == (2, 24)
    torch.testing.assert_close(b @ a, torch.kron(b1 @ a1, b2 @ a2), rtol=1e-12, atol=1e-12)


def test_kron_accepts_any_strides():
    """torch.kron refuses some non-contiguous views (a sliced SVD factor): ours does not."""
    base = _rand(6, 6, seed=10)
    left, right = base[:, :3] * 2.0, base.T[1:4]
    torch.testing.assert_close(kron(left, right), torch.kron(left.contiguous(), right.contiguous()))


def test_minimal_factors_find_the_rank_of_a_redundant_product():
    b = _rand(10, 6, seed=11)
    a = _rand(6, 8, seed=12)
    b[:, 3:] = b[:, :3] @ _rand(3, 3, seed=13)  # the product has rank 3
    nb, na = minimal_factors(b, a)
    assert nb.shape == (10, 3) and na.shape == (3, 8)
    torch.testing.assert_close(nb @ na, b @ a, rtol=1e-10, atol=1e-10)


def test_minimal_factors_of_zero_are_empty():
    nb, na = minimal_factors(torch.zeros(4, 2), torch.zeros(2, 5))
    assert nb.shape == (4, 0) and na.shape == (0, 5)


def test_matrix_factors_are_exact_at_the_numerical_rank():
    full = _rand(6, 6, seed=14)
    nb, na = matrix_factors(full)
    assert nb.shape == (6, 6)
    torch.testing.assert_close(nb @ na, full, rtol=1e-12, atol=1e-12)
    low = _rand(6, 2, seed=15) @ _rand(2, 7, seed=16)
    nb, na = matrix_factors(low.float(), rtol=precision_rtol(torch.float32, 6))
    assert nb.shape == (6, 2)
    torch.testing.assert_close(nb @ na, low, rtol=1e-6, atol=1e-6)


def test_shapes_are_checked():
    with pytest.raises(ShapeMismatchError):
        hadamard_factors(torch.ones(3, 2), torch.ones(2, 4), torch.ones(3, 2), torch.ones(2, 5))
    with pytest.raises(ShapeMismatchError):
        face_splitting(torch.ones(3, 2), torch.ones(4, 2))
    with pytest.raises(ShapeMismatchError):
        kronecker_factors(torch.ones(3, 2), torch.ones(3, 4), torch.ones(3, 2), torch.ones(2, 5))
