"""What the tensors of a LyCORIS module say, whatever its algorithm: which algorithm wrote
them, its alpha and DoRA magnitude, and the layer shape LyCORIS leaves unsaid. The builders in
formats/lycoris_modules, lycoris_loha and lycoris_lokr all read their modules through these."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from loramerge.adapter import LazyTensor, ModuleKind
from loramerge.errors import FormatError
from loramerge.formats import kohya

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


def flat_kernel(
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


def kind_shapes(
    out_features: int, rank: int, width: int, kernel: tuple[int, ...]
) -> tuple[ModuleKind, tuple[int, ...], tuple[int, ...]]:
    """(kind, B shape, A shape) of a LoRA of `rank` for an out x width weight matrix."""
    if kernel:
        in_features = width // math.prod(kernel)
        ones = (1,) * len(kernel)
        return ModuleKind.CONV, (out_features, rank, *ones), (rank, in_features, *kernel)
    return ModuleKind.LINEAR, (out_features, rank), (rank, width)


def bad_shapes(context: Context, name: str, parts: dict[str, LazyTensor]) -> FormatError:
    shapes = ", ".join(f"{k} {list(t.shape)}" for k, t in sorted(parts.items()))
    return FormatError(f"has tensors of shapes that do not fit: {shapes}", file=context.path,
                       module=name)  # fmt: skip
