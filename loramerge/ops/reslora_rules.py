"""ResLoRA merge rules (docs/rules.md section 4): one chain of blocks in, one plain LoRA per
block out.

Notation: a chain holds blocks n = 0..N-1 with factors (B_n, A_n), B_n (out x R), A_n (R x in),
and one scale s = lora_alpha / r. Every function here is pure: it takes float tensors (float64 for
exact results) and plain numbers, and never forms an out x in matrix. A rule yields each block's
`BlockForm` (loramerge.ops.reslora_forms) in chain order and reads factors only where its norms
need them, so a chain may form each (B_n, A_n) when it is indexed, and a caller may advance
several chains side by side. What the weight-based estimators need from a
base weight W_n comes in a `BaseProducts`, which the caller accumulates by streaming W_n in row
tiles.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from loramerge.errors import ShapeMismatchError
from loramerge.ops.reslora_forms import BlockForm, Factors


@dataclass(frozen=True, eq=False)
class BaseProducts:
    """The base weight W (out x in) as the norms need it: ||W||_F^2, B^T W and (square W) W B.

    `bt_w` is (R x in) with B the block's stacked lora_B; `w_b` is (out x R), set only for the
    official-code variant, whose norm adds the transposed update and so needs a square W.
    """

    norm_sq: float
    bt_w: torch.Tensor
    w_b: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class PlainBlock:
    """dW_n = scale * B' @ A' as a plain LoRA, with (B', A') formed by `form`, and how it was
    obtained.

    `coefficients` holds the numbers the rule used (a_n, or c_{n,k} keyed "c_k"); `norms` the
    norms they came from, keyed by what they are and the chain index (e.g. "f*_0", "f_2",
    "g_1"). `exact` is true when dW_n equals the trained block's contribution for any input.
    """

    form: BlockForm
    scale: float
    rule: str
    exact: bool
    coefficients: dict[str, float] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    stacked: tuple[int, ...] = ()  # bs: the chain indices whose factors were stacked


def window(pre_num: int, n: int) -> int:
    """m_n = min(m, n), with m = pre_num and -1 meaning every previous block."""
    return n if pre_num < 0 else min(pre_num, n)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, and 1 when either norm is 0 (the official code's guard)."""
    if numerator == 0.0 or denominator == 0.0:
        return 1.0
    return numerator / denominator


def merged_norm(products: BaseProducts, B: torch.Tensor, X: torch.Tensor, c: float) -> float:
    """||W + c B X||_F = sqrt(||W||^2 + 2c <W, B X> + c^2 ||B X||^2) without forming W + c B X.

    <W, B X> = sum(B^T W * X) and ||B X||^2 = sum((B^T B X) * X); B is (out x R) and X
    (R x in), float64, so the cost is O(R^2 (out + in)).
    """
    cross = float((products.bt_w * X).sum())
    update = float(((B.T @ B @ X) * X).sum())
    return math.sqrt(max(products.norm_sq + 2.0 * c * cross + c * c * update, 0.0))


def official_norm(products: BaseProducts, B: torch.Tensor, A: torch.Tensor) -> float:
    """||W + (B A)^T||_F for square W (no scale, coefficient 1): <W, A^T B^T> = sum(W B * A^T)."""
    if products.w_b is None:
        raise ShapeMismatchError(
            "the official-code norm adds (B A)^T to W, which needs a square weight",
            option="norms",
            value="official",
            hint="use the default weight-based norms",
        )
    cross = float((products.w_b * A.T).sum())
    update = float(((B.T @ B @ A) * A).sum())
    return math.sqrt(max(products.norm_sq + 2.0 * cross + update, 0.0))


def merge_none(chain: Sequence[Factors], scale: float) -> Iterator[PlainBlock]:
    """res_flag 0: plain LoRA blocks without shortcuts, dW_n = s B_n A_n."""
    for n in range(len(chain)):
        yield PlainBlock(BlockForm((n,)), scale, "none", True)


def merge_bs(chain: Sequence[Factors], scale: float, pre_num: int) -> Iterator[PlainBlock]:
    """Block shortcut, exact: B' = [B_n, ..., B_{n-m_n}], A' = [A_n; ...; A_{n-m_n}], scale s."""
    for n in range(len(chain)):
        used = tuple(n - k for k in range(window(pre_num, n) + 1))
        yield PlainBlock(BlockForm(used), scale, "bs", True, stacked=used)


def _is_block(n: int, scale: float, a: float, norms: dict) -> PlainBlock:
    """B' = (1 + a_n) B_n; block 0 adds s B A (x + x) in training, so 1 + a_0 = 2 is exact."""
    return PlainBlock(BlockForm((n,), 1.0 + a), scale, "is", n == 0, {"a": a}, norms)


def merge_is_weights(
    chain: Sequence[Factors], scale: float, products: Sequence[BaseProducts]
) -> Iterator[PlainBlock]:
    """Input shortcut, weight-based (paper): a_n = f*_{n-2} / f*_{n-1}, a_0 = a_1 = 1, with
    f*_j = ||W_j + (1 + a_j) s B_j A_j||_F, from the first block upward. B' = (1 + a_n) B_n."""
    fstar: list[float] = []
    for n in range(len(chain)):
        norms: dict[str, float] = {}
        a = 1.0
        if n >= 2:
            a = ratio(fstar[n - 2], fstar[n - 1])
            norms = {f"f*_{n - 2}": fstar[n - 2], f"f*_{n - 1}": fstar[n - 1]}
        B, A = chain[n]
        fstar.append(merged_norm(products[n], B, A, (1.0 + a) * scale))
        yield _is_block(n, scale, a, norms)


def merge_is_official(
    chain: Sequence[Factors], scale: float, products: Sequence[BaseProducts]
) -> Iterator[PlainBlock]:
    """Input shortcut, official-code norms: f*_j = ||W_j + (B_j A_j)^T||_F (all computed first),
    a_n = f*_{n-2} / f*_{n-1} for n >= 2, else 1."""
    fstar = [official_norm(products[n], *chain[n]) for n in range(len(chain))]
    for n in range(len(chain)):
        a, norms = 1.0, {}
        if n >= 2:
            a = ratio(fstar[n - 2], fstar[n - 1])
            norms = {f"f*_{n - 2}": fstar[n - 2], f"f*_{n - 1}": fstar[n - 1]}
        yield _is_block(n, scale, a, norms)


def merge_is_inputs(
    chain: Sequence[Factors], scale: float, input_norms: Sequence[float]
) -> Iterator[PlainBlock]:
    """Input shortcut, input-based: a_n = f_{n-1} / f_n (1 for n = 0 or a zero norm)."""
    for n in range(len(chain)):
        a, norms = 1.0, {}
        if n >= 1:
            a = ratio(input_norms[n - 1], input_norms[n])
            norms = {f"f_{n - 1}": input_norms[n - 1], f"f_{n}": input_norms[n]}
        yield _is_block(n, scale, a, norms)


def merge_ms_scalar(
    chain: Sequence[Factors], scale: float, pre_num: int, middle_norms: Sequence[float]
) -> Iterator[PlainBlock]:
    """Middle shortcut, scalar: B' = (1 + a_n) B_n, a_n = sum_{k=1..m_n} g_{n-k} / g_n."""
    for n in range(len(chain)):
        m = window(pre_num, n)
        a = sum((ratio(middle_norms[n - k], middle_norms[n]) for k in range(1, m + 1)), 0.0)
        norms = {f"g_{n - k}": middle_norms[n - k] for k in range(m + 1)}
        form = BlockForm((n,), 1.0 + a)
        yield PlainBlock(form, scale, "ms-scalar", m == 0, {"a": a}, norms)


def _a_merge_form(n: int, coefficients: dict[str, float]) -> BlockForm:
    """A'_n = A_n + sum_k c_k A_{n-k} with the coefficients keyed "c_k"."""
    terms = tuple((n - int(key.split("_")[1]), c) for key, c in coefficients.items())
    return BlockForm((n,), a_terms=terms)


def merge_ms_amerge_inputs(
    chain: Sequence[Factors], scale: float, pre_num: int, input_norms: Sequence[float]
) -> Iterator[PlainBlock]:
    """Middle shortcut, A-merge from input norms: A'_n = A_n + sum_k (f_{n-k} / f_n) A_{n-k}."""
    for n in range(len(chain)):
        m = window(pre_num, n)
        coefficients = {
            f"c_{k}": ratio(input_norms[n - k], input_norms[n]) for k in range(1, m + 1)
        }
        form = _a_merge_form(n, coefficients)
        norms = {f"f_{n - k}": input_norms[n - k] for k in range(m + 1)}
        yield PlainBlock(form, scale, "ms-amerge", m == 0, coefficients, norms)


def merge_ms_amerge_weights(
    chain: Sequence[Factors], scale: float, pre_num: int, products: Sequence[BaseProducts]
) -> Iterator[PlainBlock]:
    """Middle shortcut, A-merge from weights: c_{n,k} = prod_{j=n-k+1..n} a_j with
    a_j = f*_{j-2} / f*_{j-1} (a_0 = a_1 = 1) and f*_j = ||W_j + s B_j A'_j||_F, upward."""
    fstar: list[float] = []
    alphas: list[float] = []
    for n in range(len(chain)):
        alphas.append(ratio(fstar[n - 2], fstar[n - 1]) if n >= 2 else 1.0)
        m = window(pre_num, n)
        coefficients = {f"c_{k}": math.prod(alphas[n - k + 1 : n + 1]) for k in range(1, m + 1)}
        form = _a_merge_form(n, coefficients)
        B, merged = form.factors(chain)  # B' = B_n: the A-merge leaves B as it is
        fstar.append(merged_norm(products[n], B, merged, scale))
        # the f* that the a_j inside the window (j >= 2; a_0 = a_1 = 1) were taken from
        used = sorted({i for j in range(max(n - m + 1, 2), n + 1) for i in (j - 2, j - 1)})
        norms = {f"f*_{i}": fstar[i] for i in used}
        yield PlainBlock(form, scale, "ms-amerge", m == 0, coefficients, norms)
