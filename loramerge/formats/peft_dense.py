"""PEFT tuners whose update has no low-rank form, read as dense updates (docs/rules.md section
6): `merge` applies them exactly, `convert` refuses them. Formulas and key names are those of
PEFT 0.21.2 (fixtures/peft-tuners/; docs/formats.md).

- IA3: ia3_l (out, 1) scales the outputs (and the bias); (1, in) scales the inputs
  (`feedforward_modules`); convolutions keep (1, channels, 1, ...) and the config decides.
- OFT: W R^T, R block-diagonal from oft_R (Cayley, or PEFT's Cayley-Neumann series).
- BOFT: (W M^T) * boft_s, M the butterfly product of Cayley blocks from boft_R.
- HRA: W H_1 ... H_r from hra_u (or I - 2 U U^T after Gram-Schmidt, apply_GS).
- MiSS "bat": per r x r block W_ij + W_ij M_i + M_i.
- FourierFT: W + Re(ifft2(S)) * scaling, positions from random_loc_seed.
- SHiRA: W + sparse D; C3A: W + block-circulant D / in; RandLoRA: W + s B' A' from the bases.
Sizes the tensors do not fix come from the base when the merge is planned.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import torch

from loramerge.adapter import Adapter, DenseUpdate, LazyTensor, ModuleKind
from loramerge.errors import FormatError
from loramerge.formats import provenance
from loramerge.formats.common import require_rank
from loramerge.formats.derived import derived
from loramerge.ops import rotations

if TYPE_CHECKING:
    from loramerge.formats.peft_tuner_context import TunerContext

F64 = torch.float64

# peft_type -> (tuner, why it has no plain-LoRA form)
WHY = {
    "IA3": ("IA3", "it scales the weight itself, so the update depends on W"),
    "OFT": ("OFT", "it rotates the weight, so the update depends on W"),
    "BOFT": ("BOFT", "it rotates the weight, so the update depends on W"),
    "HRA": ("HRA", "it reflects the weight, so the update depends on W"),
    "FOURIERFT": ("FourierFT", "its update is a dense, generally full-rank matrix"),
    "SHIRA": ("SHiRA", "its update is a sparse, generally full-rank matrix"),
    "C3A": ("C3A", "its update is a dense block-circulant, generally full-rank matrix"),
    "RANDLORA": (
        "RandLoRA",
        "its update is a sum of many scaled random bases, generally full rank",
    ),
    "MISS-BAT": (
        "MiSS (init_weights 'bat')",
        "its block update multiplies the weight, so it depends on W",
    ),
}


def _update(ctx: TunerContext, path: str, rule: str, tensors: dict[str, LazyTensor], **kw: Any):
    key = "MISS-BAT" if ctx.peft_type == "MISS" else ctx.peft_type
    method, why = WHY[key]
    fan_in_fan_out = ctx.config.get("fan_in_fan_out") is True
    return DenseUpdate(path, method, rule, tensors, why=why, fan_in_fan_out=fan_in_fan_out, **kw)


def _adapter(ctx: TunerContext, updates: dict[str, DenseUpdate], rule: str) -> Adapter:
    version = ctx.config.get("peft_version")
    tool = f"PEFT {version}" if isinstance(version, str) else "PEFT"
    method = next(iter(updates.values())).method
    base_model = ctx.config.get("base_model_name_or_path")
    task_type = ctx.config.get("task_type")
    return Adapter(
        modules={},
        dense_updates=updates,
        modules_to_save=ctx.modules_to_save,
        base_model=base_model if isinstance(base_model, str) else None,
        source_format=f"peft-{ctx.peft_type.lower()}",
        source_path=str(ctx.folder),
        task_type=task_type if isinstance(task_type, str) else None,
        metadata=provenance.stamp(ctx.metadata, tool, f"{method} (dense update, merge only)", rule),
    )


def _float(ctx: TunerContext, path: str, name: str, tensor: LazyTensor, dims: int) -> None:
    if len(tensor.shape) != dims or not tensor.dtype.is_floating_point:
        raise FormatError(
            f"{name} {list(tensor.shape)} ({tensor.dtype}) is not a {dims}-D float tensor",
            file=ctx.weights,
            module=path,
        )


def _number(ctx: TunerContext, key: str, default: float) -> float:
    value = ctx.config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{key} must be a number, got {value!r}", file=ctx.config_path)
    if not math.isfinite(float(value)):
        raise FormatError(f"{key} must be finite, got {value!r}", file=ctx.config_path)
    return float(value)


# ---------------------------------------------------------------- IA3


def _feedforward(ctx: TunerContext, path: str) -> bool:
    """PEFT's test: a full match of the regex, or a list entry the path ends with."""
    modules = ctx.config.get("feedforward_modules") or []
    if isinstance(modules, str):
        return re.fullmatch(modules, path) is not None
    return any(isinstance(m, str) and path.endswith(m) for m in modules)


def _ia3(ctx: TunerContext) -> Adapter:
    ctx.load(("ia3_l",))
    updates = {}
    for path, found in ctx.modules.items():
        (scale,) = ctx.need(path, found, "ia3_l")
        shape = scale.shape
        feedforward = _feedforward(ctx, path)
        if len(shape) == 2:
            size = shape[1] if feedforward else shape[0]
            fits = shape == ((1, size) if feedforward else (size, 1))
        else:  # convolutions: (1, channels, 1, ...)
            size = shape[1] if len(shape) > 2 else 0
            fits = shape[0] == 1 and all(s == 1 for s in shape[2:])
        if not fits or not scale.dtype.is_floating_point:
            side = "inputs (feedforward_modules)" if feedforward else "outputs"
            raise FormatError(
                f"ia3_l {list(shape)} is not one scale per {side}", file=ctx.weights, module=path
            )
        if feedforward:
            size_in = size if len(shape) == 2 else None  # a convolution's channels: checked later
            updates[path] = _update(ctx, path, "scale_in", {"scale": scale}, in_features=size_in)
        else:
            updates[path] = _update(
                ctx, path, "scale_out", {"scale": scale}, out_features=size, bias="scale"
            )
        if len(shape) > 2:
            updates[path].kind = ModuleKind.CONV
    return _adapter(
        ctx,
        updates,
        "W * l: ia3_l (out, 1) scales each output row and the bias, (1, in) "
        "(feedforward_modules) each input column",
    )


# ---------------------------------------------------------------- OFT, BOFT

OFT_CONV = (
    "PEFT's OFT forward rotates the unfolded input patches and folds them back, adding where "
    "they overlap, before the convolution; no merged kernel computes that"
)


def _oft(ctx: TunerContext) -> Adapter:
    ctx.load(("oft_R", "oft_embedding_R"))
    neumann = ctx.config.get("use_cayley_neumann", True) is True
    terms = (
        require_rank(
            ctx.config.get("num_cayley_neumann_terms", 5),
            "num_cayley_neumann_terms",
            ctx.config_path,
        )
        if neumann
        else None
    )
    coft = _number(ctx, "eps", 6e-5) if ctx.config.get("coft") is True else None
    shared = ctx.config.get("block_share") is True
    updates = {}
    for path, found in ctx.modules.items():
        if "oft_embedding_R" in found:
            raise FormatError(
                "is an OFT embedding; loramerge merges OFT on linear layers only",
                file=ctx.weights,
                module=path,
            )
        (vectors,) = ctx.need(path, found, "oft_R")
        _float(ctx, path, "oft_R", vectors, 2)
        size = rotations.block_size_of(vectors.shape[1])
        if size < 2 or (shared and vectors.shape[0] != 1):
            raise FormatError(
                f"oft_R {list(vectors.shape)} does not hold skew blocks (b (b - 1) / 2 values "
                "each; one block with block_share)",
                file=ctx.weights,
                module=path,
            )

        def blocks(vectors: LazyTensor = vectors) -> torch.Tensor:
            values = vectors.read()
            return rotations.oft_blocks(values, values.shape[0], neumann_terms=terms, coft_eps=coft)

        rotation = derived(
            blocks, (vectors.shape[0], size, size), F64, path=ctx.weights, module=path
        )
        fan_in = None if shared else vectors.shape[0] * size
        updates[path] = _update(
            ctx, path, "rotate_in", {"blocks": rotation}, in_features=fan_in,
            params={"block_size": size}, stored=math.prod(vectors.shape),
            unmergeable={"conv": OFT_CONV},
        )  # fmt: skip
    form = f"Cayley-Neumann series of {terms} terms" if terms is not None else "Cayley transform"
    return _adapter(
        ctx,
        updates,
        f"W R^T, R block-diagonal: the {form} of each skew block of oft_R"
        + (" (COFT: blocks constrained to eps)" if coft is not None else ""),
    )


def _boft(ctx: TunerContext) -> Adapter:
    ctx.load(("boft_R", "boft_s"))
    updates = {}
    for path, found in ctx.modules.items():
        matrices, row_scale = ctx.need(path, found, "boft_R", "boft_s")
        _float(ctx, path, "boft_R", matrices, 4)
        factors, count, size, other = matrices.shape
        fan_in = count * size
        butterfly = factors == 1 or (size % 2 == 0 and count % 2 ** (factors - 1) == 0)
        outputs = math.prod(row_scale.shape)  # (out, 1); (1, out) on convolutions
        if other != size or not butterfly or 1 not in row_scale.shape or len(row_scale.shape) != 2:
            raise FormatError(
                f"boft_R {list(matrices.shape)} and boft_s {list(row_scale.shape)} are not "
                "butterfly factors of square blocks and one scale per output",
                file=ctx.weights,
                module=path,
            )

        def blocks(matrices: LazyTensor = matrices) -> torch.Tensor:
            return rotations.boft_blocks(matrices.read())

        def permutations(f=factors, n=fan_in, c=count, b=size) -> torch.Tensor:
            return rotations.butterfly_permutations(n, f, c, b)

        where = {"path": ctx.weights, "module": path}
        tensors = {
            "blocks": derived(blocks, tuple(matrices.shape), F64, **where),
            "permutations": derived(permutations, (factors, fan_in), torch.int64, **where),
            "row_scale": row_scale,
        }
        updates[path] = _update(
            ctx, path, "rotate_in", tensors, in_features=fan_in, out_features=outputs,
            stored=math.prod(matrices.shape) + outputs,
        )  # fmt: skip
    return _adapter(
        ctx,
        updates,
        "(W M^T) * boft_s: M the butterfly product of the Cayley transforms of "
        "boft_R's skew parts; the bias is unchanged",
    )


# ---------------------------------------------------------------- HRA, MiSS "bat"


def _hra(ctx: TunerContext) -> Adapter:
    ctx.load(("hra_u",))
    orthonormal = ctx.config.get("apply_GS") is True
    updates = {}
    for path, found in ctx.modules.items():
        (vectors,) = ctx.need(path, found, "hra_u")
        _float(ctx, path, "hra_u", vectors, 2)
        updates[path] = _update(
            ctx, path, "reflect_in", {"vectors": vectors}, in_features=vectors.shape[0],
            params={"orthonormal": orthonormal},
        )  # fmt: skip
    if orthonormal:
        rule = "W (I - 2 U U^T), U the columns of hra_u made orthonormal (Gram-Schmidt)"
    else:
        rule = "W H_1 ... H_r, H_i = I - 2 u_i u_i^T / |u_i|^2 for the columns u_i of hra_u"
    return _adapter(ctx, updates, rule + "; the bias is unchanged")


def miss_bat(ctx: TunerContext) -> Adapter:
    """MiSS with init_weights "bat": miss_block (out / r, r, r)."""
    ctx.load(("miss_block",))
    updates = {}
    for path, found in ctx.modules.items():
        (blocks,) = ctx.need(path, found, "miss_block")
        _float(ctx, path, "miss_block", blocks, 3)
        count, size, other = blocks.shape
        if size != other or size < 1:
            raise FormatError(
                f"miss_block {list(blocks.shape)} is not (out / r, r, r)",
                file=ctx.weights,
                module=path,
            )
        updates[path] = _update(
            ctx, path, "miss_bat", {"blocks": blocks}, out_features=count * size,
            params={"block_size": size},
        )  # fmt: skip
    return _adapter(
        ctx,
        updates,
        "per r x r block W_ij (i the output block): W_ij + W_ij M_i + M_i, "
        "M = miss_block; the bias is unchanged",
    )


READERS = {"IA3": _ia3, "OFT": _oft, "BOFT": _boft, "HRA": _hra}
