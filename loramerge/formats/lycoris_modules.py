"""The modules of a LyCORIS file, one builder per algorithm, each building the plain LoRA that
equals LyCORIS's own forward: LoCon (and its Tucker form) and full here, LoHa in
formats/lycoris_loha, LoKr in formats/lycoris_lokr; what they share in formats/lycoris_parts."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from loramerge.adapter import LazyTensor, LoraModule, ModuleKind
from loramerge.errors import FormatError
from loramerge.formats import dense_forms, kohya
from loramerge.formats.derived_factors import derived_pair, flat_width
from loramerge.formats.lycoris_loha import loha
from loramerge.formats.lycoris_lokr import lokr
from loramerge.formats.lycoris_parts import (
    Context,
    alpha_of,
    bad_shapes,
    kind_shapes,
    magnitude_of,
    need,
)
from loramerge.ops.lowrank_forms import tucker_down

ALGORITHM_NAMES = {
    "locon": "LoCon (plain LoRA)",
    "locon-tucker": "LoCon Tucker (exact conv LoRA of rank r)",
    "loha": "LoHa (exact LoRA of rank r*r, Khatri-Rao form)",
    "lokr": "LoKr (exact LoRA of rank rank(W1)*rank(W2), Kronecker mixed product)",
    "full": "full (dense diff: merge only)",
}


def _locon(
    context: Context,
    name: str,
    parts: dict[str, LazyTensor],
    component: str | None,
    module_path: str,
) -> LoraModule:
    down, up = need(context.path, name, parts, "lora_down.weight", "lora_up.weight")
    mid = parts.get("lora_mid.weight")
    if mid is None:
        plain = kohya._module(
            context.path, name, {"lora_down.weight": down, "lora_up.weight": up},
            component, module_path,
        )  # fmt: skip
        return replace(
            plain,
            alpha=alpha_of(context.path, name, parts, plain.r),
            magnitude=magnitude_of(context.path, name, parts, up.shape[0]),
        )
    r = down.shape[0] if down.shape else 0
    if (
        len(mid.shape) != 4
        or mid.shape[:2] != (r, r)
        or len(down.shape) not in (2, 4)
        or math.prod(down.shape[2:]) != 1
        or len(up.shape) not in (2, 4)
        or up.shape[1] != r
        or math.prod(up.shape[2:]) != 1
    ):
        raise bad_shapes(context, name, parts)
    out_features, in_features, kernel = up.shape[0], down.shape[1], tuple(mid.shape[2:])

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        lora_a = tucker_down(mid.float(), down.float().reshape(r, in_features))
        return up.float().reshape(out_features, r), lora_a

    lora_b, lora_a = derived_pair((out_features, r, 1, 1), (r, in_features, *kernel), compute)
    return LoraModule(
        path=module_path,
        lora_A=lora_a,
        lora_B=lora_b,
        alpha=alpha_of(context.path, name, parts, r),
        kind=ModuleKind.CONV,
        magnitude=magnitude_of(context.path, name, parts, out_features),
        component=component,
    )


def _full(
    context: Context,
    name: str,
    parts: dict[str, LazyTensor],
    component: str | None,
    module_path: str,
) -> LoraModule:
    (diff,) = need(context.path, name, parts, "diff")
    bias = parts.get("diff_b")
    if len(diff.shape) not in (2, 3, 4, 5) or (bias is not None and bias.shape != diff.shape[:1]):
        raise bad_shapes(context, name, parts)
    if "dora_scale" in parts:
        raise FormatError(
            "is a LyCORIS full module with DoRA, which loramerge does not read",
            file=context.path,
            module=name,
        )
    out_features, width, kernel = diff.shape[0], flat_width(diff.shape), tuple(diff.shape[2:])
    rank = min(out_features, width)

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        dense = diff.float().reshape(out_features, width)
        if out_features <= width:  # I @ D: exact (every product is x * 1 or x * 0)
            return torch.eye(out_features), dense
        return dense, torch.eye(width)

    reason = "a LyCORIS full module (W' = W + diff) is a dense update with no low-rank form"
    kind, shape_b, shape_a = kind_shapes(out_features, rank, width, kernel)
    lora_b, lora_a = derived_pair(shape_b, shape_a, compute, reason)
    twin = dense_forms.full_form(module_path, diff, bias, reason, kind=kind, component=component)
    return LoraModule(
        path=module_path,
        lora_A=lora_a,
        lora_B=lora_b,
        alpha=float(rank),  # scale 1
        kind=kind,
        bias=bias,  # b' = b + 1 * diff_b
        component=component,
        dense=twin,
    )


BUILDERS = {
    "locon": _locon,
    "locon-tucker": _locon,
    "loha": loha,
    "lokr": lokr,
    "full": _full,
}
