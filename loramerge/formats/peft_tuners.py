"""PEFT tuners other than LoRA, read into their exact plain-LoRA form (docs/rules.md section 6);
tuners with no low-rank form are read as dense updates by formats/peft_dense*.

Formulas and key names are those of PEFT 0.21.2 (checked against its forward on the fixtures in
fixtures/peft-tuners/; docs/formats.md). Saved keys are `base_model.model.<module path>.<param>`
without the adapter name and, for tuners whose parameters are a ParameterDict, without
`.weight`; tensors shared by all modules are saved as `base_model.<name>`.

Exact forms (factors derived lazily, float32):
- AdaLoRA: B (A * E), scale lora_alpha / (init_r + 1e-5): PEFT divides by `ranknum`, which is
  the initial rank even after pruning. Modules pruned to rank 0 change nothing and are dropped.
- LoHa: (w1a w1b) * (w2a w2b) * alpha / r is a LoRA of rank r^2 (face-splitting product).
- LoKr: kron(w1, w2) * alpha / r is a LoRA of rank rank(w1) * rank(w2) (mixed-product rule);
  each side is refactored at its numerical rank first, a full side by its SVD.
- VeRA: (lambda_b * vera_B[:out]) (lambda_d * vera_A[:, :in]), scale 1.
- MiSS (default and "mini"): miss^T S with S (r x in), S[j, i] = 1 iff i % r == j, scale 1.
- DeLoRA: B diag(lambda / r / (|A_i| |B^i|)) A, times the saved column norms w_norm, scale 1.
VeRA and MiSS do not store a module's input size: the base model (--base) gives it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import Adapter, LazyTensor
from loramerge.errors import FormatError, located
from loramerge.formats import dense_forms
from loramerge.formats.common import require_rank
from loramerge.formats.derived import derived, derived_pair
from loramerge.formats.derived_factors import high_rank_reason
from loramerge.formats.peft import CONFIG_NAME
from loramerge.formats.peft_tuner_context import (
    TunerContext,
    config_pattern,
    lora_module,
    matrix_shape,
    rank_alpha,
    rank_mismatch,
    refuse_conv,
    shape_error,
)
from loramerge.formats.peft_vera_miss_delora import delora, miss, vera
from loramerge.ops.lowrank import qr_core, reduce_core
from loramerge.ops.lowrank_forms import (
    exact_factors,
    face_splitting,
    kron,
    minimal_factors,
    precision_rtol,
)

# ---------------------------------------------------------------- refusals


# peft_types that change no weight at all (prompts, routers, norms, token rows)
NO_WEIGHT_UPDATE = {
    "PROMPT_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "P_TUNING",
    "PREFIX_TUNING",
    "ADAPTION_PROMPT",
    "CPT",
    "CARTRIDGE",
    "POLY",
    "XLORA",
    "LN_TUNING",
    "TRAINABLE_TOKENS",
    "LILY",
}


def refusal(peft_type: str, config_path: Path) -> FormatError:
    """The error for a peft_type that loramerge neither turns into a LoRA nor merges."""
    if peft_type in NO_WEIGHT_UPDATE:
        return FormatError(
            f"peft_type {peft_type} changes no weight matrix (prompts, routing, norms or token "
            "rows), so it has no LoRA or merged form",
            file=config_path,
        )
    return FormatError(
        f"peft_type {peft_type} is not supported: loramerge reads LORA, the exact forms of "
        f"{', '.join(sorted(EXACT))} and the dense updates of {', '.join(sorted(dense_readers()))}",
        file=config_path,
    )


def dense_readers() -> dict[str, Callable[[TunerContext], Adapter]]:
    """The readers of tuners with no low-rank form (formats/peft_dense*), by peft_type."""
    from loramerge.formats import peft_dense, peft_dense_additive

    return {**peft_dense.READERS, **peft_dense_additive.READERS}


# ---------------------------------------------------------------- reading


def read(folder: Path, config: dict[str, Any], peft_type: str) -> Adapter:
    """A PEFT folder whose peft_type is not LORA, as an exact LoRA adapter (or refused)."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if peft_type == "MISS" and config.get("init_weights") == "bat":
        from loramerge.formats.peft_dense import miss_bat

        return miss_bat(TunerContext(folder, config, peft_type))
    reader = EXACT.get(peft_type) or dense_readers().get(peft_type)
    if reader is None:
        raise refusal(peft_type, config_path)
    context = TunerContext(folder, config, peft_type)
    return reader(context)


# ---------------------------------------------------------------- AdaLoRA


def _adalora(ctx: TunerContext) -> Adapter:
    ctx.load(("lora_A", "lora_B", "lora_E"))
    init_r = require_rank(ctx.config.get("init_r", 12), "init_r", ctx.config_path)
    lora_alpha = ctx.config.get("lora_alpha", 8)
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        raise FormatError(f"lora_alpha must be a number, got {lora_alpha!r}", file=ctx.config_path)
    if not math.isfinite(float(lora_alpha)):
        raise FormatError(f"lora_alpha must be finite, got {lora_alpha!r}", file=ctx.config_path)
    masks = config_pattern(ctx, "rank_pattern")
    modules = {}
    for path, found in ctx.modules.items():
        lora_a, lora_b, lora_e = ctx.need(path, found, "lora_A", "lora_B", "lora_E")
        r, fan_in = matrix_shape(ctx, path, "lora_A", lora_a)
        _, r_b = matrix_shape(ctx, path, "lora_B", lora_b)
        if r_b != r or tuple(lora_e.shape) != (r, 1):
            raise shape_error(
                ctx,
                path,
                f"lora_A {list(lora_a.shape)}, lora_E {list(lora_e.shape)} and lora_B "
                f"{list(lora_b.shape)} are not AdaLoRA factors of one rank",
            )
        _check_rank_mask(ctx, path, masks, init_r, r)
        if r == 0:
            ctx.dropped.append(path)
            continue
        # PEFT: scaling = lora_alpha if lora_alpha > 0 else the current rank, divided by
        # ranknum + 1e-5 where ranknum stays the initial rank through pruning
        scaling = float(lora_alpha) if lora_alpha > 0 else float(r)
        scale = scaling / (init_r + 1e-5)

        def scaled_a(lora_a: LazyTensor = lora_a, lora_e: LazyTensor = lora_e) -> torch.Tensor:
            return lora_a.read().float() * lora_e.read().float()

        modules[path] = lora_module(
            ctx,
            path,
            lora_b,
            derived(scaled_a, (r, fan_in), path=ctx.weights, module=path),
            scale,
        )
    return ctx.adapter(
        modules,
        "AdaLoRA (SVD-form LoRA: rows of A scaled by the singular values E)",
        f"B (A * E) * lora_alpha / (init_r + 1e-5), init_r {init_r}: PEFT's ranknum stays the "
        "initial rank after pruning; modules pruned to rank 0 are dropped",
    )


def _check_rank_mask(
    ctx: TunerContext, path: str, masks: dict[str, Any], init_r: int, r: int
) -> None:
    """rank_pattern holds `<path>.lora_E` -> init_r booleans; the saved rows are the True ones."""
    mask = None
    for key, value in masks.items():
        if key == f"{path}.lora_E" or key.startswith(f"{path}.lora_E."):
            mask = value
            break
    if mask is None:
        if r != init_r:
            raise rank_mismatch(ctx, path, init_r, r)
        return
    if (
        not isinstance(mask, list)
        or len(mask) != init_r
        or not all(isinstance(m, bool) for m in mask)
    ):
        raise FormatError(
            f"rank_pattern for this module must be {init_r} booleans (init_r), got "
            f"{str(mask)[:40]}",
            file=ctx.config_path,
            module=path,
        )
    if sum(mask) != r:
        raise rank_mismatch(ctx, path, sum(mask), r)


# ---------------------------------------------------------------- LoHa


def _loha(ctx: TunerContext) -> Adapter:
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


def _lokr(ctx: TunerContext) -> Adapter:
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


EXACT: dict[str, Callable[[TunerContext], Adapter]] = {
    "ADALORA": _adalora,
    "LOHA": _loha,
    "LOKR": _lokr,
    "VERA": vera,
    "MISS": miss,
    "DELORA": delora,
}
