"""PEFT LoHa and LoKr adapters as their exact plain LoRAs (docs/rules.md section 6): LoHa's
Hadamard product of two rank-r products is a LoRA of rank r^2 (face-splitting product); LoKr's
Kronecker product is a LoRA of rank rank(w1) * rank(w2) (mixed-product rule), each side
refactored at its numerical rank first; where that LoRA would be larger than the update, the
dense form a merge applies."""

from __future__ import annotations

from collections.abc import Callable

import torch

from loramerge.adapter import Adapter, LazyTensor
from loramerge.errors import FormatError, located
from loramerge.formats import dense_forms
from loramerge.formats.derived import derived, derived_pair
from loramerge.formats.derived_factors import high_rank_reason
from loramerge.formats.peft_tuner_context import (
    TunerContext,
    lora_module,
    matrix_shape,
    rank_alpha,
    rank_mismatch,
    refuse_conv,
    shape_error,
)
from loramerge.ops.lowrank import qr_core, reduce_core
from loramerge.ops.lowrank_forms import (
    exact_factors,
    face_splitting,
    kron,
    minimal_factors,
    precision_rtol,
)

# ---------------------------------------------------------------- LoHa


def loha(ctx: TunerContext) -> Adapter:
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    ctx.load((*names, "hada_t1", "hada_t2"))
    modules = {}
    for path, found in ctx.modules.items():
        refuse_conv(ctx, path, ("hada_t1", "hada_t2"), found)
        w1a, w1b, w2a, w2b = ctx.need(path, found, *names)
        out, r = matrix_shape(ctx, path, "hada_w1_a", w1a)
        shapes = [tuple(t.shape) for t in (w1a, w1b, w2a, w2b)]
        fan_in = w1b.shape[1] if len(w1b.shape) == 2 else -1
        if any(len(s) != 2 for s in shapes) or shapes != [(out, r), (r, fan_in)] * 2:
            raise shape_error(ctx, path, f"LoHa factors {shapes} do not share one rank and shape")
        expected_r, alpha = rank_alpha(ctx, path, "alpha", 8, 8.0)
        if expected_r != r:
            raise rank_mismatch(ctx, path, expected_r, r)
        scale = alpha / r
        rank = r * r
        full = min(out, fan_in)

        def b_of(w1a: LazyTensor = w1a, w2a: LazyTensor = w2a) -> torch.Tensor:
            return face_splitting(w1a.read().double(), w2a.read().double())

        def a_of(w1b: LazyTensor = w1b, w2b: LazyTensor = w2b) -> torch.Tensor:
            return face_splitting(w1b.read().double().T, w2b.read().double().T).T

        if rank <= full:
            dense = high_rank_reason(rank, out, fan_in, "this LoHa")
            lora_b = derived(b_of, (out, rank), path=ctx.weights, module=path, merge_only=dense)
            lora_a = derived(a_of, (rank, fan_in), path=ctx.weights, module=path, merge_only=dense)
        else:  # r^2 above the matrix size: the same update at rank min(out, in), exactly

            def both(b_of=b_of, a_of=a_of, full=full) -> tuple[torch.Tensor, torch.Tensor]:
                reduced = reduce_core(qr_core(b_of(), a_of()), full, dtype=torch.float64)
                return reduced.B, reduced.A

            rank = full
            dense = high_rank_reason(rank, out, fan_in, "this LoHa")
            lora_b, lora_a = derived_pair(
                both, (out, rank), (rank, fan_in), path=ctx.weights, module=path, merge_only=dense
            )
        modules[path] = lora_module(ctx, path, lora_b, lora_a, scale)
        if dense:
            factors = dense_forms.hadamard_factors([(w1a, w1b, None), (w2a, w2b, None)])
            twin = dense_forms.hadamard_form(path, "LoHa", factors, scale, dense, where=ctx.weights)
            modules[path].dense = twin
    return ctx.adapter(
        modules,
        "LoHa ((w1a w1b) * (w2a w2b)), written as a LoRA of rank r^2 (face-splitting product)",
        "scale alpha / r per module (r and alpha from rank_pattern / alpha_pattern)",
    )


# ---------------------------------------------------------------- LoKr


def lokr(ctx: TunerContext) -> Adapter:
    ctx.load(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"))
    modules = {}
    for path, found in ctx.modules.items():
        refuse_conv(ctx, path, ("lokr_t2",), found)
        expected_r, alpha = rank_alpha(ctx, path, "alpha", 8, 8.0)
        side1, factor_r1 = _lokr_side(ctx, path, found, "lokr_w1")
        side2, factor_r2 = _lokr_side(ctx, path, found, "lokr_w2")
        for factor_r in (factor_r1, factor_r2):
            if factor_r is not None and factor_r != expected_r:
                raise rank_mismatch(ctx, path, expected_r, factor_r)
        with located(ctx.weights, path):
            b1, a1 = side1()
            b2, a2 = side2()
        k = b1.shape[1] * b2.shape[1]
        if k == 0:
            ctx.dropped.append(path)
            continue
        out, fan_in = b1.shape[0] * b2.shape[0], a1.shape[1] * a2.shape[1]

        def b_of(b1=b1, b2=b2) -> torch.Tensor:
            return kron(b1, b2)

        def a_of(a1=a1, a2=a2) -> torch.Tensor:
            return kron(a1, a2)

        dense = high_rank_reason(k, out, fan_in, "this LoKr")
        modules[path] = lora_module(
            ctx,
            path,
            derived(b_of, (out, k), path=ctx.weights, module=path, merge_only=dense),
            derived(a_of, (k, fan_in), path=ctx.weights, module=path, merge_only=dense),
            alpha / expected_r,
        )
        if dense:
            sides = tuple(
                (_lokr_matrix(found, stem), (b.shape[0], a.shape[1]))
                for stem, b, a in (("lokr_w1", b1, a1), ("lokr_w2", b2, a2))
            )
            twin = dense_forms.kron_form(
                path, "LoKr", sides, alpha / expected_r, dense, where=ctx.weights
            )
            modules[path].dense = twin
    return ctx.adapter(
        modules,
        "LoKr (kron(w1, w2)), written as a LoRA of rank rank(w1) * rank(w2) "
        "(kron(B1 A1, B2 A2) = kron(B1, B2) kron(A1, A2))",
        "scale alpha / r per module, also when both sides are full (PEFT, unlike LyCORIS); "
        "each side refactored at its numerical rank (a full side by its SVD)",
    )


def _lokr_matrix(found: dict[str, LazyTensor], stem: str) -> dense_forms.Matrix:
    full = found.get(stem)
    if full is not None:
        return dense_forms.stored_matrix(full)
    return dense_forms.matrix_of(found[f"{stem}_a"], found[f"{stem}_b"])


def _lokr_side(
    ctx: TunerContext, path: str, found: dict[str, LazyTensor], stem: str
) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], int | None]:
    """One Kronecker side as a function giving its minimal exact factors (float64), and the
    rank of its stored factors (None for a full side)."""
    full, fa, fb = found.get(stem), found.get(f"{stem}_a"), found.get(f"{stem}_b")
    if full is not None and fa is None and fb is None:
        rows, cols = matrix_shape(ctx, path, stem, full)

        def of_full() -> tuple[torch.Tensor, torch.Tensor]:
            rtol = precision_rtol(full.dtype, min(rows, cols))
            b, a = exact_factors(full.read(), rtol=rtol)
            return (b, a) if bool(b.any()) else (b[:, :0], a[:0])  # a zero side: rank 0

        return of_full, None
    if full is None and fa is not None and fb is not None:
        rows, r = matrix_shape(ctx, path, f"{stem}_a", fa)
        r_b, cols = matrix_shape(ctx, path, f"{stem}_b", fb)
        if r_b != r:
            raise shape_error(
                ctx, path, f"{stem}_a {list(fa.shape)} and {stem}_b {list(fb.shape)} disagree"
            )

        def of_factors() -> tuple[torch.Tensor, torch.Tensor]:
            rtol = precision_rtol(fa.dtype, min(r, rows, cols))
            return minimal_factors(fa.read(), fb.read(), rtol=rtol)

        return of_factors, r
    raise FormatError(
        f"needs either {stem} or both {stem}_a and {stem}_b", file=ctx.weights, module=path
    )
