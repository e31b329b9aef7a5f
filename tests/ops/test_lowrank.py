"""QR-core low-rank ops checked against a float64 evaluation that forms the update matrix."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from loramerge.errors import LoramergeError, OptionError, ShapeMismatchError
from loramerge.ops.lowrank import (
    as_conv_factors,
    as_matrix_factors,
    concat_factors,
    difference_frobenius_norm,
    qr_core,
    reduce_core,
    svd_reduce,
    update_frobenius_norm,
    update_singular_values,
)
from loramerge.ops.rank_choice import numerical_rank, rank_for_energy

FAST = settings(max_examples=50, deadline=None)
REL = 1e-5  # the contract's relative tolerance for values computed in float64


def formed(B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: the out x in update, formed in float64 (tests only, small shapes)."""
    return scale * (B.double() @ A.double())


def best_rank_k(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@st.composite
def lora_factors(draw, max_dim: int = 9, max_rank: int = 10):
    """(B, A, scale) in float64 with random shapes, including r > out/in and rank deficiency."""
    out = draw(st.integers(1, max_dim))
    inp = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, max_rank))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(out, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64)
    if r >= 2 and draw(st.booleans()):
        B[:, -1] = 2.0 * B[:, 0]  # a dependent column: dW loses one rank
    scale = draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(0.05, 4.0))
    return B, A, scale


def assert_close_rel(actual: float, expected: float, scale_ref: float) -> None:
    """|actual - expected| <= REL * |expected|, plus round-off relative to the update's size."""
    assert abs(actual - expected) <= REL * abs(expected) + 1e-12 * scale_ref, (actual, expected)


# --- spectra and norms -------------------------------------------------------------------------


@pytest.mark.oracle
@FAST
@given(lora_factors())
def test_singular_values_match_formed_update(factors):
    B, A, s = factors
    ours = update_singular_values(B, A, s)
    ref = torch.linalg.svdvals(formed(B, A, s))
    n = min(B.shape[1], B.shape[0], A.shape[1])
    assert ours.shape == (n,) and ours.dtype == torch.float64
    assert torch.all(ours[:-1] >= ours[1:])
    top = float(ref[0])
    assert torch.allclose(ours, ref[:n], rtol=REL, atol=1e-12 * top)
    assert float(ref[n:].abs().sum()) <= 1e-12 * top * ref.numel()  # the rest of dW's spectrum is 0


@pytest.mark.oracle
@FAST
@given(lora_factors())
def test_frobenius_norm_matches_formed_update(factors):
    B, A, s = factors
    ref = float(torch.linalg.matrix_norm(formed(B, A, s)))
    assert ref > 0
    assert_close_rel(update_frobenius_norm(B, A, s), ref, ref)


@pytest.mark.oracle
@FAST
@given(lora_factors(), st.integers(1, 8), st.floats(-3.0, 3.0), st.integers(0, 2**31 - 1))
def test_difference_norm_matches_formed_difference(first, r2, s2, seed):
    B1, A1, s1 = first  # the second adapter has its own rank r2
    g = torch.Generator().manual_seed(seed)
    B2 = torch.randn(B1.shape[0], r2, generator=g, dtype=torch.float64)
    A2 = torch.randn(r2, A1.shape[1], generator=g, dtype=torch.float64)
    ref = float(torch.linalg.matrix_norm(formed(B1, A1, s1) - formed(B2, A2, s2)))
    size = float(torch.linalg.matrix_norm(formed(B1, A1, s1)))
    assert_close_rel(difference_frobenius_norm(B1, A1, s1, B2, A2, s2), ref, size)


def test_difference_norm_of_equal_updates_written_differently_is_zero():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(40, 6, generator=g, dtype=torch.float64)
    A = torch.randn(6, 30, generator=g, dtype=torch.float64)
    perm = torch.randperm(6, generator=g)
    # Same update: columns/rows permuted, scale moved from the factor into s.
    other = difference_frobenius_norm(B, A, 0.5, B[:, perm], 2.0 * A[perm], 0.25)
    assert other <= 1e-13 * update_frobenius_norm(B, A, 0.5)
    # A small, known difference is resolved accurately (no cancellation from forming).
    eps_B = torch.zeros(40, 1, dtype=torch.float64)
    eps_B[3, 0] = 1e-9
    eps_A = torch.zeros(1, 30, dtype=torch.float64)
    eps_A[0, 7] = 1.0
    B2, A2 = torch.cat([B, eps_B], dim=1), torch.cat([A, eps_A], dim=0)
    assert difference_frobenius_norm(B2, A2, 1.0, B, A, 1.0) == pytest.approx(1e-9, rel=1e-6)


@pytest.mark.oracle
def test_qr_core_reconstructs_update_with_orthonormal_bases():
    g = torch.Generator().manual_seed(2)
    for out, inp, r in [(7, 5, 3), (3, 8, 6), (8, 2, 5), (4, 4, 0)]:
        B = torch.randn(out, r, generator=g)
        A = torch.randn(r, inp, generator=g)
        core = qr_core(B, A, -1.5)
        p, q = min(r, out), min(r, inp)
        assert core.Qb.shape == (out, p) and core.Qa.shape == (inp, q)
        assert core.core.shape == (p, q) and core.core.dtype == torch.float64
        assert torch.allclose(core.Qb.T @ core.Qb, torch.eye(p, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(core.Qa.T @ core.Qa, torch.eye(q, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(core.Qb @ core.core @ core.Qa.T, formed(B, A, -1.5), atol=1e-12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        core.core = core.core  # type: ignore[misc]


# --- svd_reduce --------------------------------------------------------------------------------


@pytest.mark.oracle
@FAST
@given(lora_factors(), st.integers(1, 12))
def test_reduction_error_energy_match_full_svd(factors, k):
    B, A, s = factors
    dW = formed(B, A, s)
    red = svd_reduce(B, A, s, k, dtype=torch.float64)
    assert red.B.shape == (B.shape[0], k) and red.A.shape == (k, A.shape[1])
    assert red.rank == k
    norm = float(torch.linalg.matrix_norm(dW))
    ref_err = float(torch.linalg.matrix_norm(dW - best_rank_k(dW, k)))
    our_err = float(torch.linalg.matrix_norm(dW - red.B @ red.A))
    assert_close_rel(our_err, ref_err, norm)
    assert_close_rel(red.relative_error, ref_err / norm, 1.0)
    S = torch.linalg.svdvals(dW)
    energy = float((S[:k] ** 2).sum() / (S**2).sum())
    assert_close_rel(red.energy_kept, energy, 1.0)
    assert red.energy_kept + red.relative_error**2 == pytest.approx(1.0, abs=1e-12)


@pytest.mark.oracle
@FAST
@given(lora_factors(), st.integers(1, 9))
def test_reduced_product_equals_full_svd_truncation(factors, k):
    B, A, s = factors
    dW = formed(B, A, s)
    S = torch.linalg.svdvals(dW)
    assume(k < S.numel())
    assume(float(S[k - 1] - S[k]) > 1e-3 * float(S[0]))  # distinct: the truncation is unique
    red = svd_reduce(B, A, s, k, dtype=torch.float64)
    # float64 throughout; the slack covers LAPACK's thread-dependent round-off (seen once at 1e-10)
    assert torch.allclose(red.B @ red.A, best_rank_k(dW, k), rtol=0, atol=1e-8 * float(S[0]))
    # The split is balanced: B' columns and A' rows both carry sqrt(S_i).
    sqrt_s = S[:k].sqrt()
    assert torch.allclose(torch.linalg.vector_norm(red.B, dim=0), sqrt_s, rtol=1e-7)
    assert torch.allclose(torch.linalg.vector_norm(red.A, dim=1), sqrt_s, rtol=1e-7)


@pytest.mark.oracle
def test_default_output_is_float32_and_close_to_float64_result():
    g = torch.Generator().manual_seed(3)
    B = torch.randn(30, 8, generator=g)
    A = torch.randn(8, 20, generator=g)
    red32 = svd_reduce(B, A, 0.5, 4)
    red64 = svd_reduce(B, A, 0.5, 4, dtype=torch.float64)
    assert red32.B.dtype == red32.A.dtype == torch.float32
    assert red32.singular_values.dtype == torch.float64
    ref = red64.B @ red64.A
    got = red32.B.double() @ red32.A.double()
    assert torch.allclose(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    assert red32.energy_kept == red64.energy_kept


def test_reduce_core_after_choosing_rank_by_energy():
    g = torch.Generator().manual_seed(4)
    B = torch.randn(25, 6, generator=g, dtype=torch.float64) * torch.tensor(
        [10.0, 5.0, 1.0, 0.1, 0.01, 0.001], dtype=torch.float64
    )
    A = torch.linalg.qr(torch.randn(18, 6, generator=g, dtype=torch.float64)).Q.T
    core = qr_core(B, A, 2.0)
    k = rank_for_energy(core.singular_values(), 0.99)
    red = reduce_core(core, k)
    assert red.energy_kept >= 0.99
    assert k == 1 or reduce_core(core, k - 1).energy_kept < 0.99
    assert red.rank == k and red.B.shape == (25, k)


def test_rank_larger_than_in_features():
    g = torch.Generator().manual_seed(5)
    B = torch.randn(6, 8, generator=g)
    A = torch.randn(8, 3, generator=g)  # r = 8 > in = 3: at most 3 singular values
    dW = formed(B, A, 1.25)
    assert update_singular_values(B, A, 1.25).shape == (3,)
    red = svd_reduce(B, A, 1.25, 2, dtype=torch.float64)
    assert torch.allclose(red.B @ red.A, best_rank_k(dW, 2), atol=1e-10)
    padded = svd_reduce(B, A, 1.25, 5, dtype=torch.float64)  # 5 > 3 singular values: zero pad
    assert padded.B.shape == (6, 5) and padded.A.shape == (5, 3)
    assert torch.count_nonzero(padded.B[:, 3:]) == 0 and torch.count_nonzero(padded.A[3:]) == 0
    assert torch.allclose(padded.B @ padded.A, dW, atol=1e-12)
    assert padded.energy_kept == 1.0 and padded.relative_error == 0.0


@pytest.mark.oracle
def test_rank_above_numerical_rank_reproduces_update():
    g = torch.Generator().manual_seed(6)
    B = torch.randn(12, 5, generator=g, dtype=torch.float64)
    B[:, 2:] = B[:, :1] * torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)  # rank(B) = 2
    A = torch.randn(5, 9, generator=g, dtype=torch.float64)
    dW = formed(B, A, 0.7)
    S = update_singular_values(B, A, 0.7)
    assert numerical_rank(S) == 2 == int(torch.linalg.matrix_rank(dW))
    assert rank_for_energy(S, 1.0) == 2  # not 5: round-off singular values don't count
    red = svd_reduce(B, A, 0.7, 4, dtype=torch.float64)
    assert red.B.shape == (12, 4)
    assert torch.allclose(red.B @ red.A, dW, atol=1e-12 * float(S[0]))
    assert red.relative_error < 1e-12 and red.energy_kept == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("r", [0, 3])
def test_zero_update(r):
    B = torch.zeros(7, r)
    A = torch.randn(r, 4)
    S = update_singular_values(B, A, 2.0)
    assert S.shape == (min(r, 4),) and torch.count_nonzero(S) == 0
    assert update_frobenius_norm(B, A, 2.0) == 0.0
    red = svd_reduce(B, A, 2.0, 2)
    assert red.B.shape == (7, 2) and red.A.shape == (2, 4)
    assert torch.count_nonzero(red.B) == 0 and torch.count_nonzero(red.A) == 0
    assert red.energy_kept == 1.0 and red.relative_error == 0.0
    assert rank_for_energy(S, 0.9) == 1


def test_zero_scale_is_a_zero_update():
    g = torch.Generator().manual_seed(7)
    red = svd_reduce(torch.randn(5, 3, generator=g), torch.randn(3, 4, generator=g), 0.0, 2)
    assert torch.count_nonzero(red.B @ red.A) == 0 and red.energy_kept == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_upcast_exactly(dtype):
    g = torch.Generator().manual_seed(8)
    B = torch.randn(16, 6, generator=g).to(dtype)
    A = torch.randn(6, 10, generator=g).to(dtype)
    dW = formed(B, A, 0.5)  # the exact update of the stored half-precision values
    S = update_singular_values(B, A, 0.5)
    assert S.dtype == torch.float64
    assert torch.allclose(S, torch.linalg.svdvals(dW)[:6], rtol=1e-12, atol=1e-12)
    red = svd_reduce(B, A, 0.5, 3)
    assert red.B.dtype == torch.float32
    ref_err = float(torch.linalg.matrix_norm(dW - best_rank_k(dW, 3)))
    our_err = float(torch.linalg.matrix_norm(dW - red.B.double() @ red.A.double()))
    assert our_err == pytest.approx(ref_err, rel=1e-5)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, None])
def test_invalid_target_rank_is_an_option_error(rank):
    with pytest.raises(OptionError):
        svd_reduce(torch.randn(4, 2), torch.randn(2, 3), 1.0, rank)  # type: ignore[arg-type]


def test_float32_compute_dtype_is_available():
    g = torch.Generator().manual_seed(9)
    B, A = torch.randn(20, 4, generator=g), torch.randn(4, 15, generator=g)
    S32 = update_singular_values(B, A, 1.0, compute_dtype=torch.float32)
    assert S32.dtype == torch.float32
    assert torch.allclose(S32.double(), update_singular_values(B, A, 1.0), rtol=1e-5)


# --- rank_for_energy ---------------------------------------------------------------------------


@pytest.mark.oracle
def test_rank_for_energy_on_a_known_spectrum():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)  # energies 9/14, 13/14, 1
    assert rank_for_energy(S, 0.5) == 1
    assert rank_for_energy(S, 9 / 14) == 1  # reached exactly: round-off must not push to 2
    assert rank_for_energy(S, 0.9) == 2
    assert rank_for_energy(S, 13 / 14) == 2
    assert rank_for_energy(S, 0.95) == 3
    assert rank_for_energy(S, 1.0) == 3  # the numerical rank, never the zero tail
    assert rank_for_energy(S, 1.0, max_rank=2) == 2
    assert rank_for_energy(S[[2, 0, 3, 1]], 0.9) == 2  # order does not matter
    assert rank_for_energy(torch.tensor([1.0, 1.0, 1.0]), 2 / 3) == 2
    assert rank_for_energy(torch.tensor([1.0, 1e-17], dtype=torch.float64), 1.0) == 1
    assert rank_for_energy(torch.zeros(3), 0.5) == 1
    assert rank_for_energy(torch.zeros(0), 1.0) == 1


@pytest.mark.oracle
@FAST
@given(
    st.lists(st.floats(0.0, 100.0), min_size=1, max_size=12),
    st.floats(0.01, 1.0),
)
@example([1.0, 5.5e-11], 1.0)
def test_rank_for_energy_is_the_smallest_sufficient_rank(values, threshold):
    S = torch.tensor(values, dtype=torch.float64)
    assume(float(S.max()) > 0)
    k = rank_for_energy(S, threshold)
    S_sorted = torch.sort(S, descending=True).values / S.max()
    energies = torch.cumsum(S_sorted**2, 0) / (S_sorted**2).sum()
    assert 1 <= k <= numerical_rank(S)
    assert float(energies[k - 1]) >= threshold - 1e-12
    if threshold == 1.0:
        # the contract for 1.0 is the numerical rank: a tail below float64 resolution of the
        # energy sum (e.g. [1, 5.5e-11]) still counts as rank, though it adds nothing to the sum
        assert k == numerical_rank(S)
    elif k > 1:
        assert float(energies[k - 2]) < threshold


@pytest.mark.parametrize(
    ("threshold", "max_rank"), [(0.0, None), (1.5, None), (math.nan, None), (0.9, 0), (0.9, 2.0)]
)
def test_rank_for_energy_rejects_bad_options(threshold, max_rank):
    with pytest.raises(OptionError):
        rank_for_energy(torch.ones(3), threshold, max_rank)  # type: ignore[arg-type]


# --- concat_factors and conv -------------------------------------------------------------------


@pytest.mark.oracle
@FAST
@given(
    st.lists(st.tuples(st.integers(0, 5), st.floats(-3.0, 3.0)), min_size=1, max_size=4),
    st.integers(1, 8),
    st.integers(1, 8),
    st.integers(0, 2**31 - 1),
)
def test_concat_factors_is_exact(links, out, inp, seed):
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g), s) for r, s in links
    ]
    B_cat, A_cat = concat_factors(pairs, dtype=torch.float64)
    total_r = sum(r for r, _ in links)
    assert B_cat.shape == (out, total_r) and A_cat.shape == (total_r, inp)
    expected = sum(formed(B, A, s) for B, A, s in pairs)
    assert torch.allclose(B_cat @ A_cat, expected, rtol=1e-12, atol=1e-12)
    B32, A32 = concat_factors(pairs)
    assert B32.dtype == A32.dtype == torch.float32
    assert torch.equal(B32, B_cat.float()) and torch.equal(A32, A_cat.float())


def test_concat_factors_checks_its_inputs():
    with pytest.raises(OptionError):
        concat_factors([])
    with pytest.raises(ShapeMismatchError):
        concat_factors(
            [(torch.ones(4, 2), torch.ones(2, 3), 1.0), (torch.ones(5, 1), torch.ones(1, 3), 1.0)]
        )
    # A link with r = 0 contributes nothing and is allowed.
    B, A = concat_factors(
        [(torch.ones(4, 2), torch.ones(2, 3), 0.5), (torch.ones(4, 0), torch.ones(0, 3), 1.0)]
    )
    assert B.shape == (4, 2) and torch.equal(B @ A, torch.full((4, 3), 1.0))


@pytest.mark.oracle
def test_conv_factors_round_trip_and_reduce():
    g = torch.Generator().manual_seed(10)
    out, inp, r, kh, kw = 6, 3, 4, 3, 2
    A = torch.randn(r, inp, kh, kw, generator=g)
    B = torch.randn(out, r, 1, 1, generator=g)
    spec_dW = (0.5 * (B.reshape(out, r).double() @ A.reshape(r, -1).double())).reshape(
        out, inp, kh, kw
    )
    B2, A2 = as_matrix_factors(B, A)
    assert B2.shape == (out, r) and A2.shape == (r, inp * kh * kw)
    assert torch.equal(formed(B2, A2, 0.5).reshape(out, inp, kh, kw), spec_dW)
    red = svd_reduce(B2, A2, 0.5, r, dtype=torch.float64)
    Bc, Ac = as_conv_factors(red.B, red.A, (kh, kw))
    assert Bc.shape == (out, r, 1, 1) and Ac.shape == (r, inp, kh, kw)
    rebuilt = (Bc.reshape(out, r) @ Ac.reshape(r, -1)).reshape(out, inp, kh, kw)
    assert torch.allclose(rebuilt, spec_dW, atol=1e-12)
    plain_B, plain_A = torch.randn(5, 2), torch.randn(2, 7)
    flat_B, flat_A = as_matrix_factors(plain_B, plain_A)
    assert torch.equal(flat_B, plain_B) and torch.equal(flat_A, plain_A)
    with pytest.raises(ShapeMismatchError):
        as_matrix_factors(torch.randn(out, r, 3, 3), A)


# --- input validation --------------------------------------------------------------------------


def test_bad_factors_are_reported():
    with pytest.raises(ShapeMismatchError):
        update_frobenius_norm(torch.ones(4, 3), torch.ones(2, 5), 1.0)
    with pytest.raises(ShapeMismatchError):
        update_frobenius_norm(torch.ones(4, 2, 1, 1), torch.ones(2, 5), 1.0)
    with pytest.raises(LoramergeError, match="NaN"):
        update_frobenius_norm(torch.full((4, 2), math.nan), torch.ones(2, 5), 1.0)
    with pytest.raises(LoramergeError, match="floating"):
        update_frobenius_norm(torch.ones(4, 2, dtype=torch.int64), torch.ones(2, 5), 1.0)
    with pytest.raises(LoramergeError, match="scale"):
        update_frobenius_norm(torch.ones(4, 2), torch.ones(2, 5), math.inf)
    with pytest.raises(OptionError):
        qr_core(torch.ones(4, 2), torch.ones(2, 5), compute_dtype=torch.float16)
    with pytest.raises(ShapeMismatchError):
        difference_frobenius_norm(
            torch.ones(4, 2), torch.ones(2, 5), 1.0, torch.ones(4, 2), torch.ones(2, 6), 1.0
        )
