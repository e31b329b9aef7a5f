"""PEFT VeRA, MiSS and DeLoRA read into their exact plain-LoRA form (docs/rules.md section 6;
formulas in formats/peft_tuners). VeRA and MiSS do not store a module's input size: the base
model (--base) gives it."""

from __future__ import annotations

import torch

from loramerge.adapter import Adapter, LazyTensor
from loramerge.errors import FormatError
from loramerge.formats.common import require_rank
from loramerge.formats.derived import derived
from loramerge.formats.peft_tuner_context import (
    TunerContext,
    check_vector,
    config_rank,
    fan_in_fan_out,
    lora_module,
    matrix_shape,
    rank_mismatch,
    shape_error,
)

# ---------------------------------------------------------------- VeRA


def vera(ctx: TunerContext) -> Adapter:
    ctx.load(("vera_lambda_b", "vera_lambda_d"), shared=("vera_A", "vera_B"))
    vera_a, vera_b = ctx.shared_projections("vera_A", "vera_B")
    r, max_in = matrix_shape(ctx, "base_model.vera_A", "vera_A", vera_a)
    max_out, r_b = matrix_shape(ctx, "base_model.vera_B", "vera_B", vera_b)
    expected_r = require_rank(ctx.config.get("r", 256), "r", ctx.config_path)
    if r_b != r or r != expected_r:
        raise FormatError(
            f"vera_A {list(vera_a.shape)} and vera_B {list(vera_b.shape)} do not have the "
            f"configured rank {expected_r}",
            file=ctx.weights,
        )
    modules = {}
    for path, found in ctx.modules.items():
        lambda_b, lambda_d = ctx.need(path, found, "vera_lambda_b", "vera_lambda_d")
        out = lambda_b.shape[0] if len(lambda_b.shape) == 1 else -1
        check_vector(ctx, path, "vera_lambda_b", lambda_b, out)
        check_vector(ctx, path, "vera_lambda_d", lambda_d, r)
        fan_in = ctx.in_features(path, out)
        if out > max_out or fan_in > max_in:
            raise shape_error(
                ctx,
                path,
                f"needs a ({out} x {fan_in}) slice of the shared projections, which are only "
                f"{max_out} x {r} and {r} x {max_in}",
            )

        def b_of(lambda_b: LazyTensor = lambda_b, out: int = out) -> torch.Tensor:
            return lambda_b.read().float()[:, None] * vera_b.read().float()[:out]

        def a_of(lambda_d: LazyTensor = lambda_d, fan_in: int = fan_in) -> torch.Tensor:
            return lambda_d.read().float()[:, None] * vera_a.read().float()[:, :fan_in]

        modules[path] = lora_module(
            ctx,
            path,
            derived(b_of, (out, r), path=ctx.weights, module=path),
            derived(a_of, (r, fan_in), path=ctx.weights, module=path),
            1.0,
        )
    return ctx.adapter(
        modules,
        "VeRA (shared random projections, trained scaling vectors)",
        "(lambda_b * vera_B[:out]) (lambda_d * vera_A[:, :in]), scale 1; input sizes from the "
        "base model",
    )


# ---------------------------------------------------------------- MiSS


def miss(ctx: TunerContext) -> Adapter:
    ctx.load(("miss_block",))
    mode = ctx.config.get("init_weights", True)
    mini = mode == "mini"
    if not (mode is True or mode is False or mini):
        raise FormatError(
            f"init_weights {mode!r} is not a MiSS mode loramerge knows (True, 'mini', 'bat')",
            file=ctx.config_path,
        )
    modules = {}
    for path, found in ctx.modules.items():
        (block,) = ctx.need(path, found, "miss_block")
        r, width = matrix_shape(ctx, path, "miss_block", block)
        if mini:
            mini_r = require_rank(ctx.config.get("mini_r", 1), "mini_r", ctx.config_path)
            if width != mini_r:
                raise shape_error(
                    ctx, path, f"miss_block {list(block.shape)} is not (r x mini_r {mini_r})"
                )
            out = _base_out(ctx, path)
            if out % mini_r:
                raise shape_error(ctx, path, f"{out} outputs are not a multiple of mini_r {mini_r}")
        else:
            out = width
        fan_in = ctx.in_features(path, out)

        def b_of(block: LazyTensor = block, out: int = out) -> torch.Tensor:
            values = block.read().float()
            if values.shape[1] != out:  # "mini": the block repeats along the outputs
                values = values.repeat(1, out // values.shape[1])
            return values.T

        def a_of(r: int = r, fan_in: int = fan_in) -> torch.Tensor:
            selector = torch.zeros(r, fan_in)
            columns = torch.arange(fan_in)
            selector[columns % r, columns] = 1.0
            return selector

        modules[path] = lora_module(
            ctx,
            path,
            derived(b_of, (out, r), path=ctx.weights, module=path),
            derived(a_of, (r, fan_in), path=ctx.weights, module=path),
            1.0,
        )
    return ctx.adapter(
        modules,
        "MiSS" + (" (mini)" if mini else "") + " (each input i adds row i % r of the block)",
        "miss^T S with S[j, i] = 1 where i % r = j, scale 1 (PEFT's own LoRA conversion is the "
        "same); input sizes from the base model",
    )


def _base_out(ctx: TunerContext, path: str) -> int:
    """The output size of a module whose adapter does not store it (MiSS mini)."""
    shape = ctx.base_weight_shape(path)
    return shape[1] if fan_in_fan_out(ctx) else shape[0]


# ---------------------------------------------------------------- DeLoRA


def delora(ctx: TunerContext) -> Adapter:
    names = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
    ctx.load(names)
    modules = {}
    for path, found in ctx.modules.items():
        lora_a, lora_b, lam, w_norm = ctx.need(path, found, *names)
        r, fan_in = matrix_shape(ctx, path, "delora_A", lora_a)
        _, r_b = matrix_shape(ctx, path, "delora_B", lora_b)
        if r_b != r:
            raise shape_error(
                ctx,
                path,
                f"delora_A {list(lora_a.shape)} and delora_B {list(lora_b.shape)} disagree",
            )
        check_vector(ctx, path, "delora_lambda", lam, 1)
        check_vector(ctx, path, "delora_w_norm", w_norm, fan_in)
        expected_r = config_rank(ctx, path, 8)
        if expected_r != r:
            raise rank_mismatch(ctx, path, expected_r, r)

        def a_of(
            lora_a: LazyTensor = lora_a,
            lora_b: LazyTensor = lora_b,
            lam: LazyTensor = lam,
            w_norm: LazyTensor = w_norm,
            r: int = r,
        ) -> torch.Tensor:
            a, b = lora_a.read().float(), lora_b.read().float()
            a_norms = a.norm(dim=1).clamp(min=1e-4)
            b_norms = b.norm(dim=0).clamp(min=1e-4)
            row_scale = lam.read().float() / r / (a_norms * b_norms)
            return row_scale[:, None] * a * w_norm.read().float()[None, :]

        modules[path] = lora_module(
            ctx, path, lora_b, derived(a_of, (r, fan_in), path=ctx.weights, module=path), 1.0
        )
    return ctx.adapter(
        modules,
        "DeLoRA (normalised LoRA with a learned bound lambda)",
        "B diag(lambda / r / (|A_i| |B^i|)) A * w_norm (norms clamped at 1e-4; w_norm saved), "
        "scale 1",
    )
