"""The modules of a LyCORIS file, one algorithm each (LoCon and its Tucker form, LoHa, LoKr,
full), built as the plain LoRA that equals LyCORIS's own forward; DoRA magnitudes as stored."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loramerge.adapter import DenseUpdate, LazyTensor, LoraModule, ModuleKind
from loramerge.errors import FormatError
from loramerge.formats import dense_forms, kohya
from loramerge.formats.derived_factors import derived_pair, flat_width, high_rank_reason
from loramerge.ops.lowrank_forms import (
    exact_factors,
    hadamard_factors,
    kronecker_factors,
    tucker_down,
)

REFUSED = {  # a tensor part -> the LyCORIS method it belongs to, which has no additive update
    "oft_blocks": "OFT/BOFT (an orthogonal rotation of the weight, not an added update)",
    "oft_diag": "OFT/BOFT (an orthogonal rotation of the weight, not an added update)",
    "rescale": "OFT/BOFT (an orthogonal rotation of the weight, not an added update)",
    "a1.weight": "GLoRA (its update multiplies the base weight)",
    "b1.weight": "GLoRA (its update multiplies the base weight)",
    "on_input": "(IA)^3 (it scales the weight instead of adding to it)",
    "weight": "(IA)^3 (it scales the weight instead of adding to it)",
    "w_norm": "norm (it trains normalisation layers)",
    "b_norm": "norm (it trains normalisation layers)",
}
PARTS = {
    "locon": {"lora_down.weight", "lora_up.weight", "lora_mid.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "full": {"diff", "diff_b"},
}
COMMON = {"alpha", "dora_scale"}
_THREE_BY_THREE = ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")
_SHAPED = ("lora_down.weight", "lokr_w2", "hada_t1", "diff", "dora_scale")  # 4-D for convs


@dataclass
class Context:
    """What one file says about all its modules."""

    path: Path
    proj_is_conv: bool | None  # SD 1.x attention proj_in/proj_out: 1x1 conv, else linear


ALGORITHM_NAMES = {
    "locon": "LoCon (plain LoRA)",
    "locon-tucker": "LoCon Tucker (exact conv LoRA of rank r)",
    "loha": "LoHa (exact LoRA of rank r*r, Khatri-Rao form)",
    "lokr": "LoKr (exact LoRA of rank rank(W1)*rank(W2), Kronecker mixed product)",
    "full": "full (dense diff: merge only)",
}


def algorithm_of(path: Path, name: str, parts: dict[str, LazyTensor]) -> str:
    for part in parts:
        if part in REFUSED:
            raise FormatError(
                f"is a LyCORIS {REFUSED[part]} module, which has no LoRA form",
                file=path,
                module=name,
            )
    found = [a for a, keys in PARTS.items() if keys & set(parts)]
    if len(found) != 1:
        what = f"tensors of {' and '.join(found)}" if found else "no LoRA tensors"
        raise FormatError(f"holds {what}: {sorted(parts)}", file=path, module=name)
    algorithm = found[0]
    strangers = set(parts) - PARTS[algorithm] - COMMON
    if strangers:
        raise FormatError(
            f"has tensors LyCORIS {algorithm} does not write: {sorted(strangers)}",
            file=path,
            module=name,
        )
    if algorithm == "locon" and "lora_mid.weight" in parts:
        return "locon-tucker"
    return algorithm


def need(path: Path, name: str, parts: dict[str, LazyTensor], *keys: str) -> list[LazyTensor]:
    missing = [k for k in keys if k not in parts]
    if missing:
        raise FormatError(f"has no {missing[0]} tensor", file=path, module=name)
    return [parts[k] for k in keys]


def alpha_of(path: Path, name: str, parts: dict[str, LazyTensor], r: int) -> float:
    """The stored alpha; LyCORIS treats a missing or zero alpha as alpha = r."""
    return kohya.stored_alpha(path, name, parts, missing=float(r), zero=float(r))


def magnitude_of(
    path: Path, name: str, parts: dict[str, LazyTensor], out_features: int
) -> LazyTensor | None:
    """LyCORIS's dora_scale (out, 1[, 1, 1]) as a magnitude vector (out,)."""
    scale = parts.get("dora_scale")
    if scale is None:
        return None
    shape = scale.shape
    if not shape or shape[0] != out_features or math.prod(shape) != out_features:
        raise FormatError(
            f"dora_scale {list(shape)} is not one magnitude per output ({out_features}): "
            "LyCORIS DoRA with wd_on_output=False normalises input columns, which no PEFT "
            "DoRA expresses",
            file=path,
            module=name,
        )
    return LazyTensor((out_features,), scale.dtype, lambda: scale.read().reshape(out_features))


def proj_is_conv(
    grouped: dict[str, dict[str, LazyTensor]],
    names: dict[str, tuple[str | None, str]],
    metadata: dict[str, str],
) -> bool | None:
    """Whether the UNet's attention proj_in/proj_out are 1x1 convs (SD 1.x) or linear (SD 2.x,
    XL), from modules that show it by their shapes, else from ss_base_model_version."""
    votes = set()
    for name, parts in grouped.items():
        component, module_path = names[name]
        if component != "unet" or not module_path.endswith(("proj_in", "proj_out")):
            continue
        shaped = [parts[k] for k in _SHAPED if k in parts]
        votes.update(len(t.shape) == 4 for t in shaped)
    if len(votes) == 1:
        return votes.pop()
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sd_v1"):
        return True
    if version.startswith(("sd_v2", "sdxl")):
        return False
    return None


def _flat_kernel(
    context: Context,
    name: str,
    component: str | None,
    module_path: str,
    width: int,
    parts: dict[str, LazyTensor],
) -> tuple[int, ...]:
    """The kernel of a module whose factors LyCORIS stores flattened to (r, in * kernel) (LoHa,
    factored LoKr): () for a linear layer. The file does not say; the UNet's layout does."""
    dora = parts.get("dora_scale")
    conv_dora = dora is not None and len(dora.shape) == 4
    if component == "unet":
        if module_path in ("conv_in", "conv_out") or module_path.endswith(_THREE_BY_THREE):
            if width % 9:
                raise FormatError(
                    f"is a 3x3 convolution of the UNet, but its factors have {width} columns, "
                    "not a multiple of 9",
                    file=context.path,
                    module=name,
                )
            return (3, 3)
        if module_path.endswith("conv_shortcut"):
            return (1, 1)
        if module_path.endswith(("proj_in", "proj_out")):
            conv = True if conv_dora else context.proj_is_conv
            if conv is None:
                raise FormatError(
                    "the file does not say whether the UNet's proj_in/proj_out are 1x1 "
                    "convolutions (SD 1.x) or linear layers (SD 2.x, SDXL): no module shows "
                    "it and ss_base_model_version is missing",
                    file=context.path,
                    module=name,
                )
            return (1, 1) if conv else ()
    if conv_dora:
        raise FormatError(
            "is a convolution whose kernel size the file does not say (LyCORIS stores its "
            "factors flattened)",
            file=context.path,
            module=name,
        )
    return ()


def _kind_shapes(
    out_features: int, rank: int, width: int, kernel: tuple[int, ...]
) -> tuple[ModuleKind, tuple[int, ...], tuple[int, ...]]:
    """(kind, B shape, A shape) of a LoRA of `rank` for an out x width weight matrix."""
    if kernel:
        in_features = width // math.prod(kernel)
        ones = (1,) * len(kernel)
        return ModuleKind.CONV, (out_features, rank, *ones), (rank, in_features, *kernel)
    return ModuleKind.LINEAR, (out_features, rank), (rank, width)


def _bad_shapes(context: Context, name: str, parts: dict[str, LazyTensor]) -> FormatError:
    shapes = ", ".join(f"{k} {list(t.shape)}" for k, t in sorted(parts.items()))
    return FormatError(f"has tensors of shapes that do not fit: {shapes}", file=context.path,
                       module=name)  # fmt: skip


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
        raise _bad_shapes(context, name, parts)
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


def _loha(
    context: Context,
    name: str,
    parts: dict[str, LazyTensor],
    component: str | None,
    module_path: str,
) -> LoraModule:
    keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    w1a, w1b, w2a, w2b = need(context.path, name, parts, *keys)
    t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
    if (t1 is None) != (t2 is None) or any(len(t.shape) != 2 for t in (w1a, w1b, w2a, w2b)):
        raise _bad_shapes(context, name, parts)
    if t1 is not None and t2 is not None:  # Tucker: w*_a is (r, out), w*_b is (r, in)
        out_features, in_features = w1a.shape[1], w1b.shape[1]
        kernel = tuple(t1.shape[2:])
        fits = (
            len(t1.shape) == 4 == len(t2.shape)
            and t1.shape[:2] == (w1a.shape[0], w1b.shape[0])
            and t2.shape[:2] == (w2a.shape[0], w2b.shape[0])
            and t1.shape[2:] == t2.shape[2:]
            and (w2a.shape[1], w2b.shape[1]) == (out_features, in_features)
        )
        if not fits:
            raise _bad_shapes(context, name, parts)
        width = in_features * math.prod(kernel)
        sides = [(w1a, w1b, t1), (w2a, w2b, t2)]
        ranks = (w1a.shape[0], w2a.shape[0])
    else:
        out_features, width = w1a.shape[0], w1b.shape[1]
        if (
            w1a.shape[1] != w1b.shape[0]
            or w2a.shape[1] != w2b.shape[0]
            or (w2a.shape[0], w2b.shape[1]) != (out_features, width)
        ):
            raise _bad_shapes(context, name, parts)
        kernel = _flat_kernel(context, name, component, module_path, width, parts)
        sides = [(w1a, w1b, None), (w2a, w2b, None)]
        ranks = (w1a.shape[1], w2a.shape[1])
    r = w1b.shape[0]
    scale = alpha_of(context.path, name, parts, r) / r
    rank = ranks[0] * ranks[1]

    def side(up: LazyTensor, down: LazyTensor, core: LazyTensor | None):
        if core is None:
            return up.float(), down.float()
        return up.float().T, tucker_down(core.float(), down.float()).reshape(core.shape[0], -1)

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        return hadamard_factors(*side(*sides[0]), *side(*sides[1]))

    kind, shape_b, shape_a = _kind_shapes(out_features, rank, width, kernel)
    reason = high_rank_reason(rank, out_features, width, "this LoHa module")
    lora_b, lora_a = derived_pair(shape_b, shape_a, compute, reason)
    return LoraModule(
        path=module_path,
        lora_A=lora_a,
        lora_B=lora_b,
        alpha=scale * rank,
        kind=kind,
        magnitude=magnitude_of(context.path, name, parts, out_features),
        component=component,
        dense=_loha_dense(context, module_path, sides, scale, reason, kind, component),
    )


def _loha_dense(
    context: Context,
    path: str,
    sides: list,
    scale: float,
    reason: str | None,
    kind: ModuleKind,
    component: str | None,
) -> DenseUpdate | None:
    """The dense form a merge applies when the LoRA form is larger than the update."""
    if not reason:
        return None
    factors = dense_forms.hadamard_factors(sides)
    return dense_forms.hadamard_form(
        path, "LyCORIS LoHa", factors, scale, reason, kind=kind, component=component,
        where=context.path,
    )  # fmt: skip


def _lokr_side(
    context: Context, name: str, parts: dict[str, LazyTensor], which: str
) -> tuple[tuple[int, int], int, tuple[int, ...] | None, bool, object]:
    """One Kronecker side: ((rows, columns of its matrix), its rank, its kernel (None when
    flattened: unknown), whether it is stored full, and a function giving (B_i, A_i))."""
    full = parts.get(f"lokr_{which}")
    up, down = parts.get(f"lokr_{which}_a"), parts.get(f"lokr_{which}_b")
    core = parts.get(f"lokr_t{which[-1]}")
    if full is not None:
        if up is not None or down is not None or core is not None or len(full.shape) not in (2, 4):
            raise _bad_shapes(context, name, parts)
        if which == "w1" and len(full.shape) != 2:
            raise _bad_shapes(context, name, parts)
        rows, kernel = full.shape[0], tuple(full.shape[2:])
        # the exact rank of a stored matrix is its numerical rank: factor it once, now
        lora_b, lora_a = exact_factors(full.float().reshape(rows, -1))
        return (rows, lora_a.shape[1]), lora_a.shape[0], kernel, True, lambda: (lora_b, lora_a)
    if up is None or down is None or len(up.shape) != 2 or len(down.shape) != 2:
        raise FormatError(
            f"has neither lokr_{which} nor both lokr_{which}_a and lokr_{which}_b",
            file=context.path,
            module=name,
        )
    if core is not None:  # Tucker (w2 only): t2 (r, r, kh, kw), w2_a (r, c), w2_b (r, d)
        if len(core.shape) != 4 or core.shape[:2] != (up.shape[0], down.shape[0]):
            raise _bad_shapes(context, name, parts)
        kernel = tuple(core.shape[2:])

        def tucker() -> tuple[torch.Tensor, torch.Tensor]:
            flat = tucker_down(core.float(), down.float()).reshape(core.shape[0], -1)
            return up.float().T, flat

        return (up.shape[1], down.shape[1] * math.prod(kernel)), up.shape[0], kernel, False, tucker
    if up.shape[1] != down.shape[0]:
        raise _bad_shapes(context, name, parts)
    kernel = None if which == "w2" else ()
    return (
        (up.shape[0], down.shape[1]),
        up.shape[1],
        kernel,
        False,
        lambda: (up.float(), down.float()),
    )


def _lokr(
    context: Context,
    name: str,
    parts: dict[str, LazyTensor],
    component: str | None,
    module_path: str,
) -> LoraModule:
    (a, b), rank1, _, full1, side1 = _lokr_side(context, name, parts, "w1")
    (c, dk), rank2, kernel, full2, side2 = _lokr_side(context, name, parts, "w2")
    out_features, width = a * c, b * dk
    if kernel is None:
        kernel = _flat_kernel(context, name, component, module_path, width, parts)
    if full1 and full2:
        scale = 1.0  # LyCORIS stores alpha = dim for two full sides and ignores it
    else:
        r = (parts.get("lokr_w1_b") or parts["lokr_w2_b"]).shape[0]
        scale = alpha_of(context.path, name, parts, r) / r
    rank = rank1 * rank2

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        return kronecker_factors(*side1(), *side2())

    kind, shape_b, shape_a = _kind_shapes(out_features, rank, width, kernel)
    reason = high_rank_reason(rank, out_features, width, "this LoKr module")
    lora_b, lora_a = derived_pair(shape_b, shape_a, compute, reason)
    dense = None
    if reason:
        sides = ((_lokr_matrix(parts, "w1"), (a, b)), (_lokr_matrix(parts, "w2"), (c, dk)))
        dense = dense_forms.kron_form(
            module_path, "LyCORIS LoKr", sides, scale, reason, kind=kind, component=component,
            where=context.path,
        )  # fmt: skip
    return LoraModule(
        path=module_path,
        lora_A=lora_a,
        lora_B=lora_b,
        alpha=scale * rank,
        kind=kind,
        magnitude=magnitude_of(context.path, name, parts, out_features),
        component=component,
        dense=dense,
    )


def _lokr_matrix(parts: dict[str, LazyTensor], which: str) -> dense_forms.Matrix:
    """One Kronecker side as stored (full, factored or Tucker), as a float64 matrix."""
    full = parts.get(f"lokr_{which}")
    if full is not None:
        return dense_forms.stored_matrix(full)
    up, down = parts[f"lokr_{which}_a"], parts[f"lokr_{which}_b"]
    return dense_forms.matrix_of(up, down, parts.get(f"lokr_t{which[-1]}"))


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
        raise _bad_shapes(context, name, parts)
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
    kind, shape_b, shape_a = _kind_shapes(out_features, rank, width, kernel)
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
    "loha": _loha,
    "lokr": _lokr,
    "full": _full,
}
