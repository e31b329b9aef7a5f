"""The dense rules of ops/dense_updates against float64 evaluations written in the tests
(tests/dense_reference.py), applied the way the merge applies them: tile of rows by tile of
rows, and for rules that take any block, block of columns by block of columns (a weight
stored transposed)."""

from __future__ import annotations

import dense_reference as ref
import pytest
import torch

from loramerge.ops import rotations
from loramerge.ops.dense_updates import RULES, apply_bias

F64 = torch.float64
GEN = torch.Generator().manual_seed(20)


def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN, dtype=torch.float32) * scale


def applied(rule: str, tensors, params, weight: torch.Tensor, split: int, by_columns=False):
    """The rule applied to `weight` (float64) in blocks of `split` rows (or columns)."""
    entry = RULES[rule]
    prepared = entry.prepare(tensors, params, tuple(weight.shape))
    out, width = weight.shape
    result = torch.empty_like(weight)
    size = width if by_columns else out
    for start in range(0, size, split):
        stop = min(size, start + split)
        if by_columns:
            block = weight[:, start:stop].clone()
            result[:, start:stop] = entry.apply(block, prepared, (0, out), (start, stop))
        else:
            block = weight[start:stop].clone()
            result[start:stop] = entry.apply(block, prepared, (start, stop), (0, width))
    return result


def check(rule, tensors, params, weight, expected, columns_too=True):
    for split in (weight.shape[0], 7, 1):
        got = applied(rule, tensors, params, weight, split)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    if columns_too and not RULES[rule].whole_rows:
        for split in (5, 1):
            got = applied(rule, tensors, params, weight, split, by_columns=True)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.oracle
def test_ia3_scales_outputs_or_inputs():
    weight = rand(12, 20).to(F64)
    out_scale, in_scale = rand(12, 1), rand(1, 20)
    check("scale_out", {"scale": out_scale}, {}, weight, ref.ia3(weight, out_scale, False))
    check("scale_in", {"scale": in_scale}, {}, weight, ref.ia3(weight, in_scale, True))
    kernel = rand(6, 4, 3, 3).to(F64)  # a conv's input channels scale every kernel position
    channels = rand(1, 4, 1, 1)
    expected = (kernel * channels.to(F64)).reshape(6, -1)
    check("scale_in", {"scale": channels}, {}, kernel.reshape(6, -1), expected)
    bias = rand(12)
    torch.testing.assert_close(
        apply_bias("scale", bias, {"scale": out_scale}), bias.to(F64) * out_scale.to(F64)[:, 0]
    )


@pytest.mark.oracle
@pytest.mark.parametrize("terms", [None, 1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("coft", [None, 1e-3])
def test_oft_rotates_the_inputs(terms, coft):
    weight = rand(10, 24).to(F64)
    vectors = rand(3, 28, scale=0.1)  # three blocks of 8
    blocks = rotations.oft_blocks(vectors, 3, neumann_terms=terms, coft_eps=coft)
    expected = ref.oft(weight, vectors, terms, coft)
    check("rotate_in", {"blocks": blocks}, {}, weight, expected)


@pytest.mark.oracle
def test_oft_shares_one_block():
    weight = rand(6, 24).to(F64)
    vectors = rand(1, 28, scale=0.1)
    blocks = rotations.oft_blocks(vectors, 1, neumann_terms=5)
    check("rotate_in", {"blocks": blocks}, {}, weight, ref.oft(weight, vectors, 5, blocks=3))


@pytest.mark.oracle
@pytest.mark.parametrize("factors", [1, 2, 3])
def test_boft_butterfly_and_scale(factors):
    """The permutations are PEFT's own (BOFTLayer.block_butterfly_perm) in the reference."""
    from peft.tuners.boft.layer import BOFTLayer

    count, size = 8, 4
    features = count * size
    weight = rand(9, features).to(F64)
    matrices = rand(factors, count, size, size, scale=0.2)
    scale = rand(9, 1) + 1
    peft_perms = [
        BOFTLayer.block_butterfly_perm(None, features, count // 2**f, size // 2, factors - 1)
        for f in range(factors)
    ]
    tensors = {
        "blocks": rotations.boft_blocks(matrices),
        "permutations": rotations.butterfly_permutations(features, factors, count, size),
        "row_scale": scale,
    }
    expected = ref.boft(weight, matrices, scale, peft_perms)
    check("rotate_in", tensors, {}, weight, expected)


@pytest.mark.oracle
@pytest.mark.parametrize("gram_schmidt", [False, True])
def test_hra_reflects_the_inputs(gram_schmidt):
    weight = rand(11, 16).to(F64)
    vectors = rand(16, 4)
    expected = ref.hra(weight, vectors, gram_schmidt)
    check("reflect_in", {"vectors": vectors}, {"orthonormal": gram_schmidt}, weight, expected)


@pytest.mark.oracle
def test_miss_bat_blocks():
    weight = rand(12, 8).to(F64)
    blocks = rand(3, 4, 4, scale=0.3)
    check("miss_bat", {"blocks": blocks}, {}, weight, ref.miss_bat(weight, blocks))


@pytest.mark.oracle
def test_fourierft_inverse_fft_of_the_placed_spectrum():
    weight = rand(24, 40).to(F64)
    spectrum = rand(30)
    params = {"seed": 777, "scaling": 150.0}
    expected = ref.fourier(weight, spectrum, 777, 150.0)
    check("fourier", {"spectrum": spectrum}, params, weight, expected)


@pytest.mark.oracle
def test_shira_scatter_adds_repeated_positions():
    weight = rand(10, 12).to(F64)
    indices = torch.tensor([[0, 3, 3, 9, 3], [1, 2, 2, 11, 0]], dtype=torch.int32)
    values = rand(5)
    expected = ref.scatter(weight, indices, values)
    check("scatter", {"indices": indices, "values": values}, {"scale": 1.0}, weight, expected)


@pytest.mark.oracle
def test_c3a_block_circulant_equals_the_fft_definition():
    weight = rand(12, 16).to(F64)
    kernel = rand(3, 4, 4)
    check("circulant", {"kernel": kernel}, {}, weight, ref.circulant(weight, kernel))


@pytest.mark.oracle
@pytest.mark.parametrize("shape", [(16, 24), (24, 16), (16, 16)])
def test_randlora_bases(shape):
    rank = 4
    small = min(shape)
    count = -(-small // rank)
    bases_a, bases_b = rand(rank, 1, 30), rand(30, count + 1, rank)
    lam, gamma = rand(rank, count), rand(count, small)
    weight = rand(*shape).to(F64)
    tensors = {"A": bases_a, "B": bases_b, "lambda": lam, "gamma": gamma}
    expected = ref.randlora(weight, bases_a, bases_b, lam, gamma, 2.5)
    check("randlora", tensors, {"scale": 2.5}, weight, expected)


@pytest.mark.oracle
def test_kron_and_hadamard_forms():
    weight = rand(12, 30).to(F64)
    w1, w2 = rand(3, 5), rand(4, 6)
    expected = weight + torch.kron(w1.to(F64), w2.to(F64)) * 0.5
    check("kron", {"w1": w1, "w2": w2}, {"scale": 0.5}, weight, expected)
    b1, a1, b2, a2 = rand(12, 3), rand(3, 30), rand(12, 2), rand(2, 30)
    product = (b1.to(F64) @ a1.to(F64)) * (b2.to(F64) @ a2.to(F64))
    tensors = {"b1": b1, "a1": a1, "b2": b2, "a2": a2}
    check("hadamard", tensors, {"scale": 2.0}, weight, weight + product * 2.0)


@pytest.mark.oracle
def test_add_takes_the_stored_difference_and_its_bias():
    kernel = rand(6, 4, 3, 3).to(F64)
    diff = rand(6, 4, 3, 3)
    weight = kernel.reshape(6, -1)
    check("add", {"delta": diff}, {}, weight, weight + diff.to(F64).reshape(6, -1))
    bias, diff_b = rand(6), rand(6)
    torch.testing.assert_close(
        apply_bias("add", bias, {"bias": diff_b}), bias.to(F64) + diff_b.to(F64)
    )


def test_butterfly_permutations_are_peft_s():
    from peft.tuners.boft.layer import BOFTLayer

    for features, count, size, factors in [(64, 8, 8, 2), (128, 16, 8, 3), (64, 8, 8, 4)]:
        for f in range(factors):
            peft = BOFTLayer.block_butterfly_perm(
                None, features, count // 2**f, size // 2, factors - 1
            )
            assert torch.equal(rotations.butterfly_permutation(features, count, size, f), peft)


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_float32_tile_rounds_the_float64_value_once(dtype):
    """Values just off the midpoints between neighbours of the output dtype, where float32 lands
    on the midpoint itself: converting the float32 tile must round as the float64 value does."""
    from loramerge.ops.dense_updates import float32_rounding_once

    low = torch.tensor([1.0, -3.5, 0.0078125, 1000.0], dtype=F64).to(dtype)
    bits = low.view(torch.int16).to(torch.int32)
    high = (bits + 1).to(torch.int16).view(dtype)
    middle = (low.to(F64) + high.to(F64)) / 2
    tiny = middle.abs() * 2.0**-40
    values = torch.cat([middle + tiny, middle - tiny, middle, rand(1000).to(F64) * 10])
    got = float32_rounding_once(values, dtype).to(dtype)
    assert torch.equal(got.view(torch.int16), ref.round_once(values, dtype).view(torch.int16))
    assert not torch.equal(values.to(dtype), got)  # torch's own conversion rounds twice here
    exact = float32_rounding_once(values, torch.float32)
    assert torch.equal(exact, values.to(torch.float32))
