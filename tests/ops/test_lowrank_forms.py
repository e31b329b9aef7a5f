"""Exact LoRA forms of Hadamard, Kronecker, Tucker and dense updates, against float64 products."""

from __future__ import annotations

import pytest
import torch

from loramerge.errors import ShapeMismatchError
from loramerge.ops.lowrank_forms import (
    exact_factors,
    face_splitting,
    hadamard_factors,
    kron,
    kronecker_factors,
    minimal_factors,
    precision_rtol,
    tucker_down,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_hadamard_is_a_lora_of_rank_r1_times_r2():
    b1, a1, b2, a2 = _rand(7, 3, seed=1), _rand(3, 5, seed=2), _rand(7, 2, seed=3), _rand(2, 5)
    b, a = hadamard_factors(b1, a1, b2, a2)
    assert b.shape == (7, 6) and a.shape == (6, 5) and b.dtype == torch.float64
    torch.testing.assert_close(b @ a, (b1 @ a1) * (b2 @ a2), rtol=1e-12, atol=1e-12)


def test_kronecker_is_a_lora_of_rank_r1_times_r2():
    b1, a1, b2, a2 = _rand(2, 1, seed=1), _rand(1, 3, seed=2), _rand(4, 2, seed=3), _rand(2, 5)
    b, a = kronecker_factors(b1, a1, b2, a2)
    assert b.shape == (8, 2) and a.shape == (2, 15)
    torch.testing.assert_close(b @ a, torch.kron(b1 @ a1, b2 @ a2), rtol=1e-12, atol=1e-12)


def test_tucker_down_gives_the_tucker_update_as_a_conv_lora():
    core, down, up = _rand(3, 4, 3, 3, seed=1), _rand(4, 6, seed=2), _rand(5, 3, seed=3)
    dense = torch.einsum("abyx,bi,oa->oiyx", core, down, up)
    a = tucker_down(core, down)
    assert a.shape == (3, 6, 3, 3)
    torch.testing.assert_close((up @ a.reshape(3, -1)).reshape(5, 6, 3, 3), dense)


def test_exact_factors_find_the_numerical_rank():
    low = _rand(9, 2, seed=1) @ _rand(2, 6, seed=2)
    b, a = exact_factors(low)
    assert b.shape == (9, 2) and a.shape == (2, 6)
    torch.testing.assert_close(b @ a, low, rtol=1e-12, atol=1e-12)
    b, a = exact_factors(torch.zeros(3, 4))
    assert b.shape == (3, 1) and float((b @ a).abs().max()) == 0.0


def test_shapes_that_do_not_meet_are_refused():
    with pytest.raises(ShapeMismatchError):
        hadamard_factors(_rand(7, 3), _rand(3, 5), _rand(6, 2), _rand(2, 5))
    with pytest.raises(ShapeMismatchError):
        kronecker_factors(_rand(7, 3), _rand(2, 5), _rand(6, 2), _rand(2, 5))
    with pytest.raises(ShapeMismatchError):
        tucker_down(_rand(3, 4, 3, 3), _rand(3, 6))


def test_face_splitting_rows_are_kronecker_products():
    left, right = _rand(5, 3, seed=4), _rand(5, 4, seed=5)
    out = face_splitting(left, right)
    assert out.shape == (5, 12)
    for i in range(5):
        assert torch.equal(out[i], torch.kron(left[i], right[i]))
    b, _ = hadamard_factors(left, _rand(3, 2), right, _rand(4, 2))
    assert torch.equal(out, b)


def test_kron_accepts_any_strides():
    """torch.kron refuses some views (a scaled slice of an SVD factor): kron does not."""
    u = _rand(6, 6, seed=6)
    left, right = u[:, :3] * 2.0, u.T[1:4]
    torch.testing.assert_close(kron(left, right), torch.kron(left.contiguous(), right.contiguous()))
    _, s, vh = torch.linalg.svd(_rand(4, 4, seed=7))
    side = s[:2].sqrt()[:, None] * vh[:2]
    _, a = kronecker_factors(_rand(3, 2, seed=8), side, _rand(2, 1, seed=9), _rand(1, 3))
    assert a.shape == (2, 12)


def test_minimal_factors_find_the_rank_of_a_redundant_product():
    b = _rand(10, 6, seed=11)
    a = _rand(6, 8, seed=12)
    b[:, 3:] = b[:, :3] @ _rand(3, 3, seed=13)  # the product has rank 3
    nb, na = minimal_factors(b, a)
    assert nb.shape == (10, 3) and na.shape == (3, 8)
    torch.testing.assert_close(nb @ na, b @ a, rtol=1e-10, atol=1e-10)
    nb, na = minimal_factors(torch.zeros(4, 2), torch.zeros(2, 5))
    assert nb.shape == (4, 0) and na.shape == (0, 5)


def test_precision_threshold_drops_the_rounding_of_stored_values():
    low = (_rand(6, 2, seed=14) @ _rand(2, 7, seed=15)).float()
    b, a = exact_factors(low, rtol=precision_rtol(torch.float32, 6))
    assert b.shape == (6, 2)
    torch.testing.assert_close(b @ a, low.double(), rtol=1e-6, atol=1e-6)


def test_kronecker_takes_transposed_columns():
    """torch.kron itself fails on a transposed (n x 1) factor; the factors must not."""
    b2, a2 = _rand(1, 4, seed=1).T, _rand(1, 18, seed=2)
    b1, a1 = _rand(2, 2, seed=3).T, _rand(2, 2, seed=4).T
    b, a = kronecker_factors(b1, a1, b2, a2)
    torch.testing.assert_close(b @ a, torch.kron((b1 @ a1).contiguous(), (b2 @ a2).contiguous()))


def test_derived_factors_are_computed_once_per_pair_and_not_kept():
    from loramerge.formats.derived_factors import derived_pair

    calls = []

    def compute():
        calls.append(1)
        return torch.ones(3, 2), torch.ones(2, 4)

    lora_b, lora_a = derived_pair((3, 2), (2, 4), compute)
    lora_b.read(), lora_a.read()
    assert len(calls) == 1  # one computation for both halves
    lora_a.read()
    assert len(calls) == 2  # not kept after both were taken
    lora_b.load(), lora_a.load()
    lora_b.load(), lora_a.load()
    assert len(calls) == 3  # load() keeps its value
