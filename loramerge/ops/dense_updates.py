"""Dense update rules: updates with no low-rank form, applied to a block of the base weight
(docs/rules.md section 6).

W is the (out x in) matrix the layer multiplies (conv kernels flattened). A rule is two pure
functions: `prepare(tensors, params, shape)` turns the update's tensors into what it applies
(once per weight), and `apply(block, prepared, rows, cols)` gives the new values of the block
W[rows[0]:rows[1], cols[0]:cols[1]] from its old ones. Everything is float64; the caller
passes the base values upcast and rounds the result once.

Rules that mix a row's inputs (rotations, reflections, MiSS blocks) need whole rows
(`whole_rows`); the others take any block, so a weight stored transposed (Conv1D) streams by
its stored rows too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from loramerge.ops import dense_deltas, rotations

F64 = torch.float64
Span = tuple[int, int]
Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Rule:
    prepare: Callable[[Tensors, Mapping[str, Any], tuple[int, int]], Any]
    apply: Callable[[torch.Tensor, Any, Span, Span], torch.Tensor]
    whole_rows: bool = False  # the block must hold every input of its rows


# ---------------------------------------------------------------- W' = W + D


def _add_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    return tensors["delta"].reshape(shape)  # upcast a block at a time


def _add_apply(block: torch.Tensor, delta: torch.Tensor, rows: Span, cols: Span):
    return block.add_(delta[rows[0] : rows[1], cols[0] : cols[1]].to(F64))


def _delta_rule(make: Callable[..., Any], rows_of: Callable[..., torch.Tensor]) -> Rule:
    """A rule W + D whose D rows_of(prepared, rows, cols) computes block by block."""

    def apply(block: torch.Tensor, prepared: Any, rows: Span, cols: Span) -> torch.Tensor:
        return block.add_(rows_of(prepared, rows, cols))

    return Rule(make, apply)


# ---------------------------------------------------------------- W' = f(W)


def _vector_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    return tensors["scale"].to(F64).reshape(-1)


def _scale_out(block: torch.Tensor, scale: torch.Tensor, rows: Span, cols: Span):
    """IA3 on the outputs: row o times l[o]."""
    return block.mul_(scale[rows[0] : rows[1]].reshape(-1, 1))


def _scale_in_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    scale = _vector_prepare(tensors, params, shape)
    return scale.repeat_interleave(shape[1] // scale.numel())  # one per kernel position


def _scale_in(block: torch.Tensor, scale: torch.Tensor, rows: Span, cols: Span):
    """IA3 on the inputs: column i times l[i]."""
    return block.mul_(scale[cols[0] : cols[1]].reshape(1, -1))


def _rotate_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    blocks = tensors["blocks"].to(F64)
    if blocks.dim() == 3:
        blocks = blocks.unsqueeze(0)
    factors, count, size, _ = blocks.shape
    if count * size != shape[1]:  # OFT block_share: one block for every run of inputs
        blocks = blocks.expand(factors, shape[1] // size, size, size)
    permutations = tensors.get("permutations")
    if permutations is None:
        permutations = torch.arange(shape[1]).reshape(1, -1).expand(blocks.shape[0], -1)
    row_scale = tensors.get("row_scale")
    return blocks, permutations.long(), None if row_scale is None else row_scale.to(F64)


def _rotate_in(block: torch.Tensor, prepared: Any, rows: Span, cols: Span):
    """OFT, BOFT: W M^T, then (BOFT) each row times boft_s."""
    blocks, permutations, row_scale = prepared
    rotated = rotations.butterfly_inputs(block, blocks, permutations)
    if row_scale is not None:
        rotated = rotated * row_scale.reshape(-1)[rows[0] : rows[1]].reshape(-1, 1)
    return rotated


def _reflect_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    orthonormal = bool(params.get("orthonormal", False))
    return rotations.householder_vectors(tensors["vectors"], orthonormal), orthonormal


def _reflect_in(block: torch.Tensor, prepared: Any, rows: Span, cols: Span):
    """HRA: W H_1 ... H_r."""
    units, orthonormal = prepared
    return rotations.reflect_inputs(block, units, orthonormal)


def _miss_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    return tensors["blocks"].to(F64)


def _miss_bat(block: torch.Tensor, blocks: torch.Tensor, rows: Span, cols: Span):
    """MiSS "bat": each r x r block W_ij (i the output block) becomes W_ij + W_ij M_i + M_i.
    Row o of W_ij M_i is row o of W_ij times M_i, so rows are independent."""
    size = blocks.shape[-1]
    index = torch.arange(rows[0], rows[1])
    per_row = blocks[index // size]  # (n, r, r): the M_i of each row
    split = block.reshape(block.shape[0], -1, size)
    added = torch.einsum("njk,nkl->njl", split, per_row)
    own = per_row[torch.arange(index.numel()), index % size]  # row o % r of M_i
    return (split + added + own.unsqueeze(1)).reshape(block.shape)


RULES: dict[str, Rule] = {
    "add": Rule(_add_prepare, _add_apply),
    "scale_out": Rule(_vector_prepare, _scale_out),
    "scale_in": Rule(_scale_in_prepare, _scale_in),
    "rotate_in": Rule(_rotate_prepare, _rotate_in, whole_rows=True),
    "reflect_in": Rule(_reflect_prepare, _reflect_in, whole_rows=True),
    "miss_bat": Rule(_miss_prepare, _miss_bat, whole_rows=True),
    "fourier": _delta_rule(dense_deltas.fourier_prepare, dense_deltas.dense_rows),
    "scatter": Rule(dense_deltas.scatter_prepare, dense_deltas.scatter_apply),
    "circulant": _delta_rule(dense_deltas.circulant_prepare, dense_deltas.circulant_rows),
    "randlora": _delta_rule(dense_deltas.randlora_prepare, dense_deltas.product_rows),
    "kron": _delta_rule(dense_deltas.kron_prepare, dense_deltas.kron_rows),
    "hadamard": _delta_rule(dense_deltas.hadamard_prepare, dense_deltas.hadamard_rows),
}


def apply_bias(how: str, bias: torch.Tensor, tensors: Tensors) -> torch.Tensor:
    """The layer's new bias (float64): b + d ("add") or b * l ("scale")."""
    if how == "add":
        return bias.to(F64) + tensors["bias"].to(F64).reshape(-1)
    if how == "scale":
        return bias.to(F64) * tensors["scale"].to(F64).reshape(-1)
    raise ValueError(f"unknown bias rule {how!r}")


def float32_rounding_once(values: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """float32 values whose conversion to `out_dtype` is `values` (float64) rounded once.

    The nearest float32 is that, except where it falls exactly halfway between two neighbours of
    the output dtype while the float64 value does not: converting it would then break a tie that
    is not there. Those few are moved one float32 step toward the float64 value, so that the
    conversion rounds to the side the float64 value is on."""
    near = values.to(torch.float32)
    if out_dtype in (torch.float32, torch.float64):
        return near
    wide = near.to(F64)
    rounded = near.to(out_dtype).to(F64)
    other = 2 * wide - rounded  # the neighbour on the other side, when `near` is halfway
    halfway = (rounded != wide) & torch.isfinite(rounded) & (other.to(out_dtype).to(F64) == other)
    moved = halfway & (values != wide)
    if not bool(moved.any()):
        return near
    toward = torch.where(values > wide, torch.inf, -torch.inf).to(torch.float32)
    return torch.where(moved, torch.nextafter(near, toward), near)
