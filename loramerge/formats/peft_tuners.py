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
from loramerge.errors import FormatError
from loramerge.formats.common import require_rank
from loramerge.formats.derived import derived
from loramerge.formats.peft import CONFIG_NAME
from loramerge.formats.peft_loha_lokr import loha, lokr
from loramerge.formats.peft_tuner_context import (
    TunerContext,
    config_pattern,
    lora_module,
    matrix_shape,
    rank_mismatch,
    shape_error,
)
from loramerge.formats.peft_vera_miss_delora import delora, miss, vera

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


EXACT: dict[str, Callable[[TunerContext], Adapter]] = {
    "ADALORA": _adalora,
    "LOHA": loha,
    "LOKR": lokr,
    "VERA": vera,
    "MISS": miss,
    "DELORA": delora,
}
