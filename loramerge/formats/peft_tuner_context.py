"""What every PEFT tuner reader shares (formats/peft_tuners, peft_vera_miss_delora,
peft_dense*): the folder's config and tensors grouped by module, and the checks and module
construction they all use. Key names are PEFT 0.21.2's (see formats/peft_tuners)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind, match_pattern
from loramerge.errors import FormatError, OptionError, opt
from loramerge.formats import provenance
from loramerge.formats.common import lazy_weights, require_positive, require_rank
from loramerge.formats.peft import CONFIG_NAME, PREFIX, weights_file
from loramerge.formats.read_context import current_base

SHARED_PREFIX = "base_model."
# what each tuner is called in messages, by peft_type
NAMES = {
    "ADALORA": "AdaLoRA",
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "VERA": "VeRA",
    "MISS": "MiSS",
    "DELORA": "DeLoRA",
}


# ---------------------------------------------------------------- reading


@dataclass
class TunerContext:
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

    def shared_projections(self, a: str, b: str) -> tuple[LazyTensor, LazyTensor]:
        """The random projections all modules share (VeRA, RandLoRA), which PEFT saves only
        with save_projection."""
        if a not in self.shared or b not in self.shared:
            raise FormatError(
                f"holds no shared {a} / {b}: with save_projection false PEFT regenerates them "
                "from projection_prng_key, which loramerge does not do",
                file=self.weights,
                hint="save the adapter with save_projection=True",
            )
        return self.shared[a], self.shared[b]


# ---------------------------------------------------------------- helpers


def shape_error(ctx: TunerContext, module: str, what: str) -> FormatError:
    return FormatError(what, file=ctx.weights, module=module)


def matrix_shape(ctx: TunerContext, module: str, name: str, tensor: LazyTensor) -> tuple[int, int]:
    if len(tensor.shape) != 2 or not tensor.dtype.is_floating_point:
        raise shape_error(
            ctx, module, f"{name} {list(tensor.shape)} ({tensor.dtype}) is not a float matrix"
        )
    return tensor.shape[0], tensor.shape[1]


def check_vector(ctx: TunerContext, module: str, name: str, tensor: LazyTensor, size: int) -> None:
    if tuple(tensor.shape) != (size,) or not tensor.dtype.is_floating_point:
        raise shape_error(
            ctx, module, f"{name} is {list(tensor.shape)}, expected a float vector [{size}]"
        )


def config_pattern(ctx: TunerContext, key: str) -> dict[str, Any]:
    value = ctx.config.get(key)
    if not value:
        return {}
    if not isinstance(value, dict):
        raise FormatError(
            f"{key} must map module patterns to numbers, got {type(value).__name__}",
            file=ctx.config_path,
        )
    return value


def config_rank(ctx: TunerContext, module: str, default_r: int) -> int:
    """The module's configured r: the first matching rank_pattern entry, else `r`."""
    r_value, what = ctx.config.get("r", default_r), "r"
    ranks = config_pattern(ctx, "rank_pattern")
    found = match_pattern(ranks, module)
    if found is not None:
        r_value, what = ranks[found], f"rank_pattern[{found!r}]"
    return require_rank(r_value, what, ctx.config_path, module)


def rank_alpha(
    ctx: TunerContext, module: str, alpha_key: str, default_r: int, default_alpha: float
) -> tuple[int, float]:
    """The module's configured r and alpha: rank_pattern / alpha_pattern, else the defaults."""
    r = config_rank(ctx, module, default_r)
    alpha_value = ctx.config.get(alpha_key, default_alpha)
    alphas = config_pattern(ctx, "alpha_pattern")
    found = match_pattern(alphas, module)
    what = alpha_key
    if found is not None:
        alpha_value, what = alphas[found], f"alpha_pattern[{found!r}]"
    return r, require_positive(alpha_value, what, ctx.config_path, module)


def rank_mismatch(ctx: TunerContext, module: str, expected: int, found: int) -> FormatError:
    return FormatError(
        f"the config gives rank {expected} but the tensors have rank {found}",
        file=ctx.config_path,
        module=module,
        hint="fix r or rank_pattern in adapter_config.json",
    )


def fan_in_fan_out(ctx: TunerContext) -> bool:
    return ctx.config.get("fan_in_fan_out") is True


def lora_module(
    ctx: TunerContext, path: str, lora_b: LazyTensor, lora_a: LazyTensor, scale: float
) -> LoraModule:
    """A plain LoRA module whose alpha gives `scale` at its rank."""
    return LoraModule(
        path=path,
        lora_A=lora_a,
        lora_B=lora_b,
        alpha=scale * lora_a.shape[0],
        kind=ModuleKind.LINEAR,
        fan_in_fan_out=fan_in_fan_out(ctx),
    )


def refuse_conv(ctx: TunerContext, module: str, names: tuple[str, ...], found: dict) -> None:
    present = [n for n in names if n in found]
    if present:
        raise FormatError(
            f"holds {present[0]}, the Tucker form of a convolution; loramerge reads "
            f"{ctx.peft_type} on linear layers only",
            file=ctx.weights,
            module=module,
        )
