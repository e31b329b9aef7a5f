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
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind, match_pattern
from loramerge.errors import FormatError, OptionError, located, opt
from loramerge.formats import dense_forms, provenance
from loramerge.formats.common import lazy_weights, require_positive, require_rank
from loramerge.formats.derived import derived, derived_pair
from loramerge.formats.derived_factors import high_rank_reason
from loramerge.formats.peft import CONFIG_NAME, PREFIX, weights_file
from loramerge.formats.read_context import current_base
from loramerge.ops.lowrank import qr_core, reduce_core
from loramerge.ops.lowrank_forms import (
    exact_factors,
    face_splitting,
    kron,
    minimal_factors,
    precision_rtol,
)

SHARED_PREFIX = "base_model."

# ---------------------------------------------------------------- refusals

NAMES = {
    "ADALORA": "AdaLoRA",
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "VERA": "VeRA",
    "MISS": "MiSS",
    "DELORA": "DeLoRA",
}

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


def dense_readers() -> dict[str, Callable[[_Context], Adapter]]:
    """The readers of tuners with no low-rank form (formats/peft_dense*), by peft_type."""
    from loramerge.formats import peft_dense, peft_dense_additive

    return {**peft_dense.READERS, **peft_dense_additive.READERS}


# ---------------------------------------------------------------- reading


@dataclass
class _Context:
    folder: Path
    config: dict[str, Any]
    peft_type: str
    weights: Path = field(init=False)
    modules: dict[str, dict[str, LazyTensor]] = field(default_factory=dict)
    shared: dict[str, LazyTensor] = field(default_factory=dict)
    modules_to_save: dict[str, LazyTensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    _base_shapes: dict[str, tuple[int, ...]] | None = None

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_NAME

    def load(self, params: tuple[str, ...], shared: tuple[str, ...] = ()) -> None:
        """Sort the weight file's tensors into per-module parameters and shared tensors."""
        self.weights = weights_file(self.folder)
        tensors, self.metadata = lazy_weights(self.weights)
        key = re.compile(r"^(?P<path>.+)\.(?P<param>" + "|".join(params) + r")(?:\.weight)?$")
        save = self.config.get("modules_to_save") or []
        for name, tensor in tensors.items():
            if name.startswith(PREFIX):
                inner = name[len(PREFIX) :]
                found = key.match(inner)
                if found is not None:
                    self.modules.setdefault(found["path"], {})[found["param"]] = tensor
                    continue
                saved = inner.replace(".modules_to_save.default.", ".")
                if isinstance(save, list) and any(
                    f".{n}." in f".{saved}" for n in save if isinstance(n, str)
                ):
                    self.modules_to_save[saved] = tensor
                    continue
            elif name.startswith(SHARED_PREFIX) and name[len(SHARED_PREFIX) :] in shared:
                self.shared[name[len(SHARED_PREFIX) :]] = tensor
                continue
            raise FormatError(
                f"holds tensor {name!r}, which is not a {self.peft_type} parameter",
                file=self.weights,
                hint=f"a {self.peft_type} adapter saves {', '.join(params)} per module",
            )
        if not self.modules:
            raise FormatError(
                f"holds no {self.peft_type} tensors",
                file=self.weights,
                hint="is this the right file?",
            )

    def need(self, module: str, found: dict[str, LazyTensor], *names: str) -> list[LazyTensor]:
        missing = [n for n in names if n not in found]
        if missing:
            raise FormatError(f"has no {missing[0]} tensor", file=self.weights, module=module)
        return [found[n] for n in names]

    def base_weight_shape(self, module: str) -> tuple[int, int]:
        """The base model's 2-D weight shape of a module (VeRA and MiSS store no input size)."""
        if self._base_shapes is None:
            base = current_base()
            if base is None:
                raise OptionError(
                    f"{NAMES.get(self.peft_type, self.peft_type)} adapters (peft_type "
                    f"{self.peft_type}) do not store each module's input size; the base model "
                    "gives it",
                    file=self.folder,
                    hint=f"pass {opt('base')}",
                )
            from loramerge.model.folder import open_base

            self._base_shapes = {
                name: tuple(entry.shape) for name, (_, entry) in open_base(base).locate().items()
            }
        shape = self._base_shapes.get(f"{module}.weight")
        if shape is None or len(shape) != 2:
            raise FormatError(
                f"the base model has no 2-D weight {module}.weight for this module",
                file=self.weights,
                module=module,
                hint="pass the base model this adapter was trained on",
            )
        return shape[0], shape[1]

    def in_features(self, module: str, out: int) -> int:
        """A module's input size from the base model's weight shape (VeRA, MiSS)."""
        shape = self.base_weight_shape(module)
        if shape[0] == out:
            return shape[1]
        if shape[1] == out:  # GPT-2 Conv1D stores (in x out)
            return shape[0]
        raise FormatError(
            f"has {out} outputs but the base weight is {list(shape)}",
            file=self.weights,
            module=module,
            hint="pass the base model this adapter was trained on",
        )

    def adapter(self, modules: dict[str, LoraModule], algorithm: str, rule: str) -> Adapter:
        if not modules:
            raise FormatError(
                "no module of this adapter changes the model "
                f"({len(self.dropped)} modules have rank 0)",
                file=self.weights,
            )
        notes = ""
        if self.dropped:
            notes = f"dropped {len(self.dropped)} modules of rank 0 (no update): " + ", ".join(
                self.dropped
            )
        version = self.config.get("peft_version")
        tool = f"PEFT {version}" if isinstance(version, str) else "PEFT"
        base_model = self.config.get("base_model_name_or_path")
        task_type = self.config.get("task_type")
        return Adapter(
            modules=modules,
            modules_to_save=self.modules_to_save,
            base_model=base_model if isinstance(base_model, str) else None,
            source_format=f"peft-{self.peft_type.lower()}",
            source_path=str(self.folder),
            task_type=task_type if isinstance(task_type, str) else None,
            metadata=provenance.stamp(self.metadata, tool, algorithm, rule, notes),
        )


def read(folder: Path, config: dict[str, Any], peft_type: str) -> Adapter:
    """A PEFT folder whose peft_type is not LORA, as an exact LoRA adapter (or refused)."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if peft_type == "MISS" and config.get("init_weights") == "bat":
        from loramerge.formats.peft_dense import miss_bat

        return miss_bat(_Context(folder, config, peft_type))
    reader = EXACT.get(peft_type) or dense_readers().get(peft_type)
    if reader is None:
        raise refusal(peft_type, config_path)
    context = _Context(folder, config, peft_type)
    return reader(context)


# ---------------------------------------------------------------- helpers


def _shape_error(ctx: _Context, module: str, what: str) -> FormatError:
    return FormatError(what, file=ctx.weights, module=module)


def _matrix(ctx: _Context, module: str, name: str, tensor: LazyTensor) -> tuple[int, int]:
    if len(tensor.shape) != 2 or not tensor.dtype.is_floating_point:
        raise _shape_error(
            ctx, module, f"{name} {list(tensor.shape)} ({tensor.dtype}) is not a float matrix"
        )
    return tensor.shape[0], tensor.shape[1]


def _vector(ctx: _Context, module: str, name: str, tensor: LazyTensor, size: int) -> None:
    if tuple(tensor.shape) != (size,) or not tensor.dtype.is_floating_point:
        raise _shape_error(
            ctx, module, f"{name} is {list(tensor.shape)}, expected a float vector [{size}]"
        )


def _pattern(ctx: _Context, key: str) -> dict[str, Any]:
    value = ctx.config.get(key)
    if not value:
        return {}
    if not isinstance(value, dict):
        raise FormatError(
            f"{key} must map module patterns to numbers, got {type(value).__name__}",
            file=ctx.config_path,
        )
    return value


def _config_rank(ctx: _Context, module: str, default_r: int) -> int:
    """The module's configured r: the first matching rank_pattern entry, else `r`."""
    r_value, what = ctx.config.get("r", default_r), "r"
    ranks = _pattern(ctx, "rank_pattern")
    found = match_pattern(ranks, module)
    if found is not None:
        r_value, what = ranks[found], f"rank_pattern[{found!r}]"
    return require_rank(r_value, what, ctx.config_path, module)


def _rank_alpha(
    ctx: _Context, module: str, alpha_key: str, default_r: int, default_alpha: float
) -> tuple[int, float]:
    """The module's configured r and alpha: rank_pattern / alpha_pattern, else the defaults."""
    r = _config_rank(ctx, module, default_r)
    alpha_value = ctx.config.get(alpha_key, default_alpha)
    alphas = _pattern(ctx, "alpha_pattern")
    found = match_pattern(alphas, module)
    what = alpha_key
    if found is not None:
        alpha_value, what = alphas[found], f"alpha_pattern[{found!r}]"
    return r, require_positive(alpha_value, what, ctx.config_path, module)


def _rank_mismatch(ctx: _Context, module: str, expected: int, found: int) -> FormatError:
    return FormatError(
        f"the config gives rank {expected} but the tensors have rank {found}",
        file=ctx.config_path,
        module=module,
        hint="fix r or rank_pattern in adapter_config.json",
    )


def _fan_in_fan_out(ctx: _Context) -> bool:
    return ctx.config.get("fan_in_fan_out") is True


def _module(
    ctx: _Context, path: str, lora_b: LazyTensor, lora_a: LazyTensor, scale: float
) -> LoraModule:
    """A plain LoRA module whose alpha gives `scale` at its rank."""
    return LoraModule(
        path=path,
        lora_A=lora_a,
        lora_B=lora_b,
        alpha=scale * lora_a.shape[0],
        kind=ModuleKind.LINEAR,
        fan_in_fan_out=_fan_in_fan_out(ctx),
    )


def _refuse_conv(ctx: _Context, module: str, names: tuple[str, ...], found: dict) -> None:
    present = [n for n in names if n in found]
    if present:
        raise FormatError(
            f"holds {present[0]}, the Tucker form of a convolution; loramerge reads "
            f"{ctx.peft_type} on linear layers only",
            file=ctx.weights,
            module=module,
        )


# ---------------------------------------------------------------- AdaLoRA


def _adalora(ctx: _Context) -> Adapter:
    ctx.load(("lora_A", "lora_B", "lora_E"))
    init_r = require_rank(ctx.config.get("init_r", 12), "init_r", ctx.config_path)
    lora_alpha = ctx.config.get("lora_alpha", 8)
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        raise FormatError(f"lora_alpha must be a number, got {lora_alpha!r}", file=ctx.config_path)
    if not math.isfinite(float(lora_alpha)):
        raise FormatError(f"lora_alpha must be finite, got {lora_alpha!r}", file=ctx.config_path)
    masks = _pattern(ctx, "rank_pattern")
    modules = {}
    for path, found in ctx.modules.items():
        lora_a, lora_b, lora_e = ctx.need(path, found, "lora_A", "lora_B", "lora_E")
        r, fan_in = _matrix(ctx, path, "lora_A", lora_a)
        _, r_b = _matrix(ctx, path, "lora_B", lora_b)
        if r_b != r or tuple(lora_e.shape) != (r, 1):
            raise _shape_error(
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

        modules[path] = _module(
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


def _check_rank_mask(ctx: _Context, path: str, masks: dict[str, Any], init_r: int, r: int) -> None:
    """rank_pattern holds `<path>.lora_E` -> init_r booleans; the saved rows are the True ones."""
    mask = None
    for key, value in masks.items():
        if key == f"{path}.lora_E" or key.startswith(f"{path}.lora_E."):
            mask = value
            break
    if mask is None:
        if r != init_r:
            raise _rank_mismatch(ctx, path, init_r, r)
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
        raise _rank_mismatch(ctx, path, sum(mask), r)


# ---------------------------------------------------------------- LoHa


def _loha(ctx: _Context) -> Adapter:
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    ctx.load((*names, "hada_t1", "hada_t2"))
    modules = {}
    for path, found in ctx.modules.items():
        _refuse_conv(ctx, path, ("hada_t1", "hada_t2"), found)
        w1a, w1b, w2a, w2b = ctx.need(path, found, *names)
        out, r = _matrix(ctx, path, "hada_w1_a", w1a)
        shapes = [tuple(t.shape) for t in (w1a, w1b, w2a, w2b)]
        fan_in = w1b.shape[1] if len(w1b.shape) == 2 else -1
        if any(len(s) != 2 for s in shapes) or shapes != [(out, r), (r, fan_in)] * 2:
            raise _shape_error(ctx, path, f"LoHa factors {shapes} do not share one rank and shape")
        expected_r, alpha = _rank_alpha(ctx, path, "alpha", 8, 8.0)
        if expected_r != r:
            raise _rank_mismatch(ctx, path, expected_r, r)
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
        modules[path] = _module(ctx, path, lora_b, lora_a, scale)
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


def _lokr(ctx: _Context) -> Adapter:
    ctx.load(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"))
    modules = {}
    for path, found in ctx.modules.items():
        _refuse_conv(ctx, path, ("lokr_t2",), found)
        expected_r, alpha = _rank_alpha(ctx, path, "alpha", 8, 8.0)
        side1, factor_r1 = _lokr_side(ctx, path, found, "lokr_w1")
        side2, factor_r2 = _lokr_side(ctx, path, found, "lokr_w2")
        for factor_r in (factor_r1, factor_r2):
            if factor_r is not None and factor_r != expected_r:
                raise _rank_mismatch(ctx, path, expected_r, factor_r)
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
        modules[path] = _module(
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
    ctx: _Context, path: str, found: dict[str, LazyTensor], stem: str
) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], int | None]:
    """One Kronecker side as a function giving its minimal exact factors (float64), and the
    rank of its stored factors (None for a full side)."""
    full, fa, fb = found.get(stem), found.get(f"{stem}_a"), found.get(f"{stem}_b")
    if full is not None and fa is None and fb is None:
        rows, cols = _matrix(ctx, path, stem, full)

        def of_full() -> tuple[torch.Tensor, torch.Tensor]:
            rtol = precision_rtol(full.dtype, min(rows, cols))
            b, a = exact_factors(full.read(), rtol=rtol)
            return (b, a) if bool(b.any()) else (b[:, :0], a[:0])  # a zero side: rank 0

        return of_full, None
    if full is None and fa is not None and fb is not None:
        rows, r = _matrix(ctx, path, f"{stem}_a", fa)
        r_b, cols = _matrix(ctx, path, f"{stem}_b", fb)
        if r_b != r:
            raise _shape_error(
                ctx, path, f"{stem}_a {list(fa.shape)} and {stem}_b {list(fb.shape)} disagree"
            )

        def of_factors() -> tuple[torch.Tensor, torch.Tensor]:
            rtol = precision_rtol(fa.dtype, min(r, rows, cols))
            return minimal_factors(fa.read(), fb.read(), rtol=rtol)

        return of_factors, r
    raise FormatError(
        f"needs either {stem} or both {stem}_a and {stem}_b", file=ctx.weights, module=path
    )


# ---------------------------------------------------------------- VeRA


def _vera(ctx: _Context) -> Adapter:
    ctx.load(("vera_lambda_b", "vera_lambda_d"), shared=("vera_A", "vera_B"))
    if "vera_A" not in ctx.shared or "vera_B" not in ctx.shared:
        raise FormatError(
            "holds no shared vera_A / vera_B: with save_projection false PEFT regenerates them "
            "from projection_prng_key, which loramerge does not do",
            file=ctx.weights,
            hint="save the adapter with save_projection=True",
        )
    vera_a, vera_b = ctx.shared["vera_A"], ctx.shared["vera_B"]
    r, max_in = _matrix(ctx, "base_model.vera_A", "vera_A", vera_a)
    max_out, r_b = _matrix(ctx, "base_model.vera_B", "vera_B", vera_b)
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
        _vector(ctx, path, "vera_lambda_b", lambda_b, out)
        _vector(ctx, path, "vera_lambda_d", lambda_d, r)
        fan_in = ctx.in_features(path, out)
        if out > max_out or fan_in > max_in:
            raise _shape_error(
                ctx,
                path,
                f"needs a ({out} x {fan_in}) slice of the shared projections, which are only "
                f"{max_out} x {r} and {r} x {max_in}",
            )

        def b_of(lambda_b: LazyTensor = lambda_b, out: int = out) -> torch.Tensor:
            return lambda_b.read().float()[:, None] * vera_b.read().float()[:out]

        def a_of(lambda_d: LazyTensor = lambda_d, fan_in: int = fan_in) -> torch.Tensor:
            return lambda_d.read().float()[:, None] * vera_a.read().float()[:, :fan_in]

        modules[path] = _module(
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


def _miss(ctx: _Context) -> Adapter:
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
        r, width = _matrix(ctx, path, "miss_block", block)
        if mini:
            mini_r = require_rank(ctx.config.get("mini_r", 1), "mini_r", ctx.config_path)
            if width != mini_r:
                raise _shape_error(
                    ctx, path, f"miss_block {list(block.shape)} is not (r x mini_r {mini_r})"
                )
            out = _base_out(ctx, path)
            if out % mini_r:
                raise _shape_error(
                    ctx, path, f"{out} outputs are not a multiple of mini_r {mini_r}"
                )
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

        modules[path] = _module(
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


def _base_out(ctx: _Context, path: str) -> int:
    """The output size of a module whose adapter does not store it (MiSS mini)."""
    shape = ctx.base_weight_shape(path)
    return shape[1] if _fan_in_fan_out(ctx) else shape[0]


# ---------------------------------------------------------------- DeLoRA


def _delora(ctx: _Context) -> Adapter:
    names = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
    ctx.load(names)
    modules = {}
    for path, found in ctx.modules.items():
        lora_a, lora_b, lam, w_norm = ctx.need(path, found, *names)
        r, fan_in = _matrix(ctx, path, "delora_A", lora_a)
        _, r_b = _matrix(ctx, path, "delora_B", lora_b)
        if r_b != r:
            raise _shape_error(
                ctx,
                path,
                f"delora_A {list(lora_a.shape)} and delora_B {list(lora_b.shape)} disagree",
            )
        _vector(ctx, path, "delora_lambda", lam, 1)
        _vector(ctx, path, "delora_w_norm", w_norm, fan_in)
        expected_r = _config_rank(ctx, path, 8)
        if expected_r != r:
            raise _rank_mismatch(ctx, path, expected_r, r)

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

        modules[path] = _module(
            ctx, path, lora_b, derived(a_of, (r, fan_in), path=ctx.weights, module=path), 1.0
        )
    return ctx.adapter(
        modules,
        "DeLoRA (normalised LoRA with a learned bound lambda)",
        "B diag(lambda / r / (|A_i| |B^i|)) A * w_norm (norms clamped at 1e-4; w_norm saved), "
        "scale 1",
    )


EXACT: dict[str, Callable[[_Context], Adapter]] = {
    "ADALORA": _adalora,
    "LOHA": _loha,
    "LOKR": _lokr,
    "VERA": _vera,
    "MISS": _miss,
    "DELORA": _delora,
}
