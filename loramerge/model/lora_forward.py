"""An adapter applied live to a transformers model, as forward hooks: the forward PEFT computes
(docs/rules.md section 1), without PEFT. `verify --text` and the ResLoRA merge check run
adapters through it; a merge never does, so it stays an independent check of the merged
weights."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch.nn import functional

from loramerge.adapter import Adapter, LoraModule, ModuleKind
from loramerge.errors import ShapeMismatchError
from loramerge.model.names import resolve_tensor_name


class Hooks(ABC):
    """Forward hooks registered on entry and removed on exit; reusable."""

    def __init__(self, model) -> None:
        self.model = model
        self._handles: list = []
        self._replaced: list[tuple[Any, str, Any]] = []  # (module, attribute, original)
        self._names: dict[str, str] | None = None

    def _module(self, path: str):
        """The model's module at `path`: the in-memory name, or the one an on-disk name (or a
        name with another prefix) refers to."""
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            pass
        if self._names is None:
            self._names = {f"{name}.weight": name for name, _ in self.model.named_modules()}
        found = resolve_tensor_name(f"{path}.weight", self._names)
        if found is None:
            raise ShapeMismatchError("the transformers model has no such module", module=path)
        return self.model.get_submodule(self._names[found])

    @abstractmethod
    def _register(self) -> None:
        """Register this object's hooks, appending their handles to self._handles."""

    def _replace(self, name: str, value: torch.Tensor) -> None:
        """Give one module its own copy of a parameter (a tied twin keeps the original) until
        exit."""
        path, _, attribute = name.rpartition(".")
        layer = self._module(path)
        original = getattr(layer, attribute)
        if tuple(original.shape) != tuple(value.shape):
            raise ShapeMismatchError(
                f"the adapter's {name} is {list(value.shape)}, the model's {list(original.shape)}",
                module=path,
            )
        self._replaced.append((layer, attribute, original))
        replacement = torch.nn.Parameter(value.to(original.dtype), requires_grad=False)
        setattr(layer, attribute, replacement)

    def __enter__(self):
        self._register()
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer, attribute, original in reversed(self._replaced):
            setattr(layer, attribute, original)
        self._replaced = []


class PlainForward(Hooks):
    """PEFT's forward of a plain adapter: h += s B A x on every module (linear, GPT-2 Conv1D,
    embedding, convolution), DoRA's magnitude, the LoRA bias, and the full tensors the adapter
    carries (modules_to_save, saved base tables) in place of the base's."""

    def __init__(self, model, adapter: Adapter) -> None:
        super().__init__(model)
        self.adapter = adapter

    def _register(self) -> None:
        for name, tensor in {**self.adapter.base_tables, **self.adapter.modules_to_save}.items():
            self._replace(name, tensor.load())
        for module in self.adapter.modules.values():
            layer = self._module(module.path)
            self._handles.append(layer.register_forward_hook(_hook(layer, module)))


def layer_kind(layer) -> ModuleKind:
    """How an update lands on this layer, from its class (docs/rules.md section 1): the model
    decides, not the adapter's claim."""
    if isinstance(layer, torch.nn.Embedding):
        return ModuleKind.EMBEDDING
    if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return ModuleKind.CONV
    if type(layer).__name__ == "Conv1D":  # transformers' GPT-2 layer, weight stored in x out
        return ModuleKind.CONV1D
    return ModuleKind.LINEAR


def _hook(layer, module: LoraModule):
    """The forward hook adding one module's update to its layer's output."""
    B, A = module.factors()
    scale, kind = module.scale, layer_kind(layer)
    bias = module.bias.float() * scale if module.bias is not None else None

    def update(x: torch.Tensor) -> torch.Tensor:
        if kind is ModuleKind.EMBEDDING:
            return functional.embedding(x, A.T) @ B.T * scale
        if kind is ModuleKind.CONV:
            return _conv(layer, x, (B @ A).reshape(layer.weight.shape)) * scale
        return ((x @ A.T) @ B.T) * scale

    def hook(_layer, args, output):
        term = update(args[0])
        if bias is not None:
            term = term + (_per_channel(bias, layer) if kind is ModuleKind.CONV else bias)
        if module.magnitude is None:
            return output + term
        return _dora(layer, kind, module, output, term)

    return hook


def _conv(layer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's convolution (1, 2 or 3-d, its stride, padding, dilation) with `weight`."""
    convolve = {3: functional.conv1d, 4: functional.conv2d, 5: functional.conv3d}[weight.dim()]
    return convolve(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _per_channel(values: torch.Tensor, layer) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast over a convolution's output."""
    return values.reshape(-1, *([1] * (layer.weight.dim() - 2)))


def _dora(
    layer, kind: ModuleKind, module: LoraModule, output: torch.Tensor, term: torch.Tensor
) -> torch.Tensor:
    """DoRA: (m / ||W + s B A||_row) * (the output without bias + the update) + bias."""
    B, A = module.factors()
    weight = layer.weight.detach().float()
    if kind in (ModuleKind.CONV1D, ModuleKind.EMBEDDING):
        weight = weight.T  # rows are outputs: the norm runs over the inputs
    merged = weight.reshape(weight.shape[0], -1) + module.scale * (B @ A)
    factor = module.magnitude.float().reshape(-1) / torch.linalg.vector_norm(merged, dim=1)
    base_bias = getattr(layer, "bias", None)
    if kind is ModuleKind.CONV:
        factor = _per_channel(factor, layer)
        base_bias = _per_channel(base_bias, layer) if base_bias is not None else None
    if base_bias is None:
        return factor * (output + term)
    return factor * (output - base_bias + term) + base_bias
