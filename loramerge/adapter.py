"""The one in-memory model of a LoRA adapter that every reader produces and every writer takes."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

from loramerge.errors import FormatError, opt
from loramerge.lazy_tensor import LazyTensor

if TYPE_CHECKING:
    import torch


class ModuleKind(str, Enum):
    """How a module's update lands on its base tensor (docs/rules.md section 1)."""

    LINEAR = "linear"  # W (out x in) += s B A
    CONV1D = "conv1d"  # transformers' Conv1D (GPT-2), W stored (in x out) += s (B A)^T
    EMBEDDING = "embedding"  # table (num x dim) += s (B A)^T, A is (r x num)
    CONV = "conv"  # nn.Conv1d/2d/3d: W (out, in, *kernel) += s reshape(B A)
    PARAMETER = "parameter"  # PEFT target_parameters: a bare 2-D parameter or 3-D expert stack


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def match_pattern(patterns: Mapping[str, float], module_path: str) -> str | None:
    """The first pattern (in order) for which `(.*\\.)?(PATTERN)$` matches the module path."""
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", module_path):
                return pattern
        except (re.error, OverflowError, RecursionError):  # patterns come from untrusted files
            if module_path == pattern or module_path.endswith("." + pattern):
                return pattern
    return None


@dataclass
class LoraModule:
    """One adapted module. `path` is the module path in the base model (no PEFT prefix).

    A is (r x in) [(r x num) for embeddings, (r, in, *kernel) for conv]; B is (out x r)
    [(dim x r), (out, r, 1, ...)]. `kind` may be refined (LINEAR to CONV1D) once the base's
    architecture is known.

    PARAMETER modules (PEFT `target_parameters`) are PEFT's ParamWrapper: `path` is the
    wrapper's module path as PEFT names it (`...experts.base_layer` for the second wrapper of
    one module); `parameter` names the wrapped parameter once the architecture says which it is.
    With `experts` > 1 the factors hold one LoRA per expert: A is (r*E x in) with expert e's
    rows at e*r..(e+1)*r, B is (out x r*E) with expert e's columns at e, e+E, e+2E, ...
    """

    path: str
    lora_A: LazyTensor
    lora_B: LazyTensor
    alpha: float
    kind: ModuleKind = ModuleKind.LINEAR
    use_rslora: bool = False
    magnitude: LazyTensor | None = None  # DoRA, shape (out,)
    bias: LazyTensor | None = None  # lora_B bias, shape (out,)
    fan_in_fan_out: bool = False  # the source's claim; the base's architecture decides
    # the model of a multi-model checkpoint the module belongs to (kohya `lora_unet_`/`lora_te1_`,
    # diffusers `unet.`/`text_encoder.`): kept through every transform, None for one model
    component: str | None = None
    parameter: str | None = None  # PARAMETER: the wrapped parameter's name on its module
    experts: int = 1  # PARAMETER: experts in the stack (3-D parameters)
    # the same update as a dense rule, which a merge applies instead of the factor product:
    # set where the exact LoRA form is larger than the dense update (LyCORIS full, LoKr and
    # LoHa of high rank); `convert` and `truncate` still use the factors
    dense: DenseUpdate | None = None

    @property
    def r(self) -> int:
        return self.lora_A.shape[0] // self.experts

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.use_rslora)

    @property
    def name(self) -> str:
        """The last component of the path (e.g. q_proj), as target_modules lists it."""
        return self.path.rsplit(".", 1)[-1]

    def factors(
        self, keep: bool = True, expert: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) as float32 matrices: conv factors are flattened, embeddings as stored; for
        a stack of experts, those of `expert`, which must then be given.
        `keep=False` does not keep factors that were not loaded yet (see LazyTensor.read)."""
        if self.kind is ModuleKind.PARAMETER and self.parameter is None:
            raise FormatError(
                "wraps a parameter (target_parameters) that only the base's architecture names, "
                "with the number of experts it stacks",
                module=self.path,
                hint=f"give the base model ({opt('base')})",
            )
        lora_b = self.lora_B.float(keep)
        lora_a = self.lora_A.float(keep)
        if self.experts > 1:
            if expert is None:
                raise FormatError(
                    f"holds one update per expert ({self.experts} experts), not one update",
                    module=self.path,
                    hint="this operation does not take LoRA on MoE experts (target_parameters)",
                )
            rank = self.r
            return lora_b[:, expert :: self.experts], lora_a[expert * rank : (expert + 1) * rank]
        return lora_b.reshape(lora_b.shape[0], -1), lora_a.reshape(lora_a.shape[0], -1)

    def with_factors(self, lora_b: torch.Tensor, lora_a: torch.Tensor, alpha: float) -> LoraModule:
        """A copy with new factors (same kind), reshaped back for conv."""
        if self.experts > 1:
            raise FormatError("per-expert factors cannot be replaced as one", module=self.path)
        if self.kind is ModuleKind.CONV:
            lora_a = lora_a.reshape(lora_a.shape[0], *self.lora_A.shape[1:])
            lora_b = lora_b.reshape(lora_b.shape[0], lora_b.shape[1], *self.lora_B.shape[2:])
        return replace(
            self, lora_A=LazyTensor.of(lora_a), lora_B=LazyTensor.of(lora_b), alpha=alpha
        )

    def with_computed_factors(
        self, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float
    ) -> LoraModule:
        """A copy whose float32 factors of rank `rank`, (B, A) as matrices, `compute` gives each
        time they are read (nothing kept), shaped as `with_factors` shapes them."""
        if self.experts > 1:
            raise FormatError("per-expert factors cannot be replaced as one", module=self.path)
        import torch

        shape_a = (rank, *self.lora_A.shape[1:])
        shape_b = (self.lora_B.shape[0], rank, *self.lora_B.shape[2:])
        lora_a = LazyTensor(shape_a, torch.float32, lambda: compute()[1].reshape(shape_a))
        lora_b = LazyTensor(shape_b, torch.float32, lambda: compute()[0].reshape(shape_b))
        return replace(self, lora_A=lora_a, lora_B=lora_b, alpha=alpha)


@dataclass
class DenseUpdate:
    """An update with no low-rank form (docs/rules.md section 6): the base weight W, seen as
    the (out x in) matrix the layer multiplies (conv kernels flattened to in * kernel columns,
    Conv1D weights untransposed), becomes a function of W and the update's tensors, computed by
    the rule `rule` of loramerge.ops.dense_updates ("add", "scale_out", "rotate_in", ...)
    with its numbers `params`.

    `out_features` / `in_features` are the sizes the tensors fix (None: the base gives them).
    `bias` says what happens to the layer's bias: None (unchanged), "add" (b + tensors["bias"])
    or "scale" (b * tensors["scale"], IA3 on the outputs). `method` names the tuner in
    messages ("IA3", "OFT", "LyCORIS full") and `why` says why it has no LoRA form.
    """

    path: str
    method: str
    rule: str
    tensors: dict[str, LazyTensor]
    params: dict[str, Any] = field(default_factory=dict)
    out_features: int | None = None
    in_features: int | None = None
    kind: ModuleKind = ModuleKind.LINEAR
    bias: str | None = None
    component: str | None = None
    fan_in_fan_out: bool = False  # the source's claim; the base's architecture decides
    why: str = ""
    stored: int | None = None  # numbers the file holds, where `tensors` are derived from them
    # layer kinds (ModuleKind values) on which the method's forward has no merged form, and why
    unmergeable: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def parameter_count(self) -> int:
        if self.stored is not None:
            return self.stored
        return sum(math.prod(t.shape) for t in self.tensors.values())


@dataclass(frozen=True)
class TokenRows:
    """Rows of an embedding table replaced by trained values (PEFT trainable_token_indices)."""

    indices: tuple[int, ...]
    values: LazyTensor  # (len(indices) x dim)


@dataclass
class Adapter:
    """A LoRA adapter: modules by path, plus full tensors it carries and where it came from.

    `modules_to_save` maps a base tensor name (e.g. `lm_head.weight`) to a trained full copy that
    replaces it; `saved_biases` likewise for biases trained with PEFT's bias="all"/"lora_only".
    `base_tables` maps a base tensor name (e.g. `model.embed_tokens.weight`) to the table PEFT
    saved as `<path>.base_layer.weight`: the base value the module's update applies to (it
    differs from the base file when tokens were added during training). `token_rows` maps an
    embedding's module path to the rows trained in place of the base's.

    `base_init` names an initialisation that changed the base during training ("pissa",
    "olora"): the factors then apply to the residual base PEFT rebuilds from the original one.
    `dense_updates` maps a module path to an update with no low-rank form (IA3, OFT, LyCORIS
    full, ...): a merge applies it exactly, nothing else writes it.
    `merge_refusal`, when set, says why no merged model can compute what the adapter does.
    `source_config` keeps the source's own configuration, for fields a writer passes through.
    """

    modules: dict[str, LoraModule]
    modules_to_save: dict[str, LazyTensor] = field(default_factory=dict)
    base_tables: dict[str, LazyTensor] = field(default_factory=dict)
    base_model: str | None = None
    source_format: str = "peft"
    source_path: str | None = None
    task_type: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    saved_biases: dict[str, LazyTensor] = field(default_factory=dict)
    token_rows: dict[str, TokenRows] = field(default_factory=dict)
    base_init: str | None = None
    merge_refusal: str | None = None
    source_config: dict[str, Any] = field(default_factory=dict)
    dense_updates: dict[str, DenseUpdate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modules = dict(sorted(self.modules.items()))
        self.dense_updates = dict(sorted(self.dense_updates.items()))

    @property
    def ranks(self) -> list[int]:
        return [module.r for module in self.modules.values()]

    def parameter_count(self) -> int:
        total = 0
        for module in self.modules.values():
            total += math.prod(module.lora_A.shape) + math.prod(module.lora_B.shape)
            for extra in (module.magnitude, module.bias):
                if extra is not None:
                    total += math.prod(extra.shape)
        full = [*self.modules_to_save.values(), *self.saved_biases.values()]
        full += [rows.values for rows in self.token_rows.values()]
        total += sum(update.parameter_count() for update in self.dense_updates.values())
        return total + sum(math.prod(t.shape) for t in full)


def common_alpha(modules: list[LoraModule]) -> float | None:
    """The one alpha for which alpha / r is every module's scale, or None when scales differ."""
    values = [m.scale * m.r for m in modules]
    if values and all(math.isclose(v, values[0], rel_tol=1e-9) for v in values):
        return values[0]
    return None
