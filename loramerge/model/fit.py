"""Fitting an adapter to its base: which parameter each module's update lands on, of what kind.

With the base's architecture (loramerge.model.architecture) every module is looked up by its
in-memory name and takes the kind transformers gives it: Conv1D or Linear is decided per module,
never from neighbours or shapes; a PEFT target_parameters wrapper is matched to its parameter by
the module's parameter order. Without an architecture (remote code, no config) the older
name-based rules apply (loramerge.model.name_rules) and the result says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from loramerge.adapter import Adapter, LoraModule, ModuleKind, match_pattern
from loramerge.errors import FormatError, ShapeMismatchError
from loramerge.model.architecture import Architecture, NoArchitecture
from loramerge.model.folder import BaseModel

WRAPPED = ".base_layer"
_NAME_NORMAL = re.compile(r"[._]")


@dataclass(frozen=True)
class Target:
    """Where one adapter module's update lands, in the model's in-memory names."""

    module: str  # the adapter's module key
    param: str  # the parameter the update is added to
    kind: ModuleKind
    shape: tuple[int, ...]  # the parameter's in-memory shape
    experts_transposed: bool = False  # a 3-D stack held as (E, in, out)


@dataclass
class Fitted:
    """An adapter resolved against its base. Parameter names are the model's in-memory names
    with an architecture, the files' tensor names without one (name-based rules)."""

    adapter: Adapter  # kinds, wrapped parameters and expert counts resolved
    targets: dict[str, Target]
    architecture: Architecture | None
    param_shapes: dict[str, tuple[int, ...]]
    tied: dict[str, str]  # target parameter -> the parameter it is tied to
    prefix: str = ""  # the model's base-model prefix, which checkpoints may omit
    notes: list[str] = field(default_factory=list)
    dense_targets: dict[str, Target] = field(default_factory=dict)  # of adapter.dense_updates

    def param_name(self, name: str) -> str | None:
        """The parameter a name from the adapter refers to (None: the base has none)."""
        if self.architecture is None:
            from loramerge.model.names import resolve_tensor_name

            return resolve_tensor_name(name, self.param_shapes)
        if name in self.param_shapes:
            return name
        prefix = self.prefix + "." if self.prefix else ""
        if prefix and prefix + name in self.param_shapes:
            return prefix + name
        if prefix and name.startswith(prefix) and name[len(prefix) :] in self.param_shapes:
            return name[len(prefix) :]
        return None


def fit_adapter(adapter: Adapter, base: BaseModel) -> Fitted:
    """Every module resolved against the base's architecture (or the name-based rules)."""
    architecture = base.architecture()
    if isinstance(architecture, NoArchitecture):
        from loramerge.model.name_rules import fit_by_names

        return fit_by_names(adapter, base, architecture.reason)
    modules, targets = {}, {}
    for module in adapter.modules.values():
        resolved, target = _fit_module(module, adapter, architecture)
        if resolved.path in modules:
            raise FormatError(
                f"two of its modules are the base's module {resolved.path}",
                file=adapter.source_path,
                module=resolved.path,
            )
        modules[resolved.path] = resolved
        targets[resolved.path] = target
    from loramerge.model.dense_fit import fit_by_architecture

    dense, dense_targets = fit_by_architecture(adapter, architecture, _find_module)
    clash = sorted(set(dense) & set(modules))
    if clash:
        raise FormatError(
            "has a LoRA module and a dense update on the same layer",
            file=adapter.source_path,
            module=clash[0],
        )
    return Fitted(
        replace(adapter, modules=modules, dense_updates=dense),
        targets,
        architecture,
        dict(architecture.parameters),
        dict(architecture.tied),
        architecture.base_model_prefix,
        dense_targets=dense_targets,
    )


def _find_module(path: str, architecture: Architecture, adapter: Adapter) -> str:
    """The in-memory module path for an adapter's module path: exact, or a unique match once
    dots and underscores are treated alike (names from kohya-style files lose their dots)."""
    if path in architecture.modules:
        return path
    wanted = _NAME_NORMAL.sub("_", path)
    normal = {
        name: _NAME_NORMAL.sub("_", name)
        for name, info in architecture.modules.items()
        if info.parameters
    }
    hits = [name for name, text in normal.items() if text == wanted]
    if not hits:
        hits = [name for name, text in normal.items() if text.endswith("_" + wanted)]
    if len(hits) == 1:
        return hits[0]
    raise FormatError(
        f"the base model ({architecture.model_class}) has no module {path}",
        file=adapter.source_path,
        module=path,
        hint="is this adapter for another base model?",
    )


def _fit_module(
    module: LoraModule, adapter: Adapter, architecture: Architecture
) -> tuple[LoraModule, Target]:
    path, depth = module.path, 0
    while path.endswith(WRAPPED):
        path, depth = path.removesuffix(WRAPPED), depth + 1
    wrapped = _wrapped_parameters(path, adapter, architecture)
    if module.kind is ModuleKind.PARAMETER or (wrapped and depth == 0):
        return _fit_parameter(module, path, depth, wrapped, adapter, architecture)
    path = _find_module(path, architecture, adapter)
    info = architecture.modules[path]
    kind = _kind(module, info.kind, adapter)
    shape = architecture.parameters.get(path + ".weight")
    if shape is None:
        raise FormatError(
            f"module {path} has no weight parameter", file=adapter.source_path, module=path
        )
    _check_shape(module, kind, shape, adapter)
    resolved = replace(module, path=path, kind=kind)
    if adapter.source_config.get("target_parameters"):
        # the PEFT reader leaves ranks to be checked here when modules may stack experts
        _, rank = _pattern_values(adapter, module.path, module.alpha)
        _check_rank(resolved, rank, adapter)
    return resolved, Target(path, path + ".weight", kind, shape)


def _kind(module: LoraModule, found: ModuleKind | None, adapter: Adapter) -> ModuleKind:
    """The kind the architecture gives, if the adapter's factors can be of that kind."""
    fits = {
        ModuleKind.LINEAR: (ModuleKind.LINEAR, ModuleKind.CONV1D),
        ModuleKind.CONV1D: (ModuleKind.LINEAR, ModuleKind.CONV1D),
        ModuleKind.EMBEDDING: (ModuleKind.EMBEDDING,),
        ModuleKind.CONV: (ModuleKind.CONV,),
    }.get(module.kind, ())
    if found in fits:
        return found
    what = found.value if found is not None else "a module type that LoRA does not adapt"
    raise FormatError(
        f"holds {module.kind.value} LoRA factors, but the base's module is {what}",
        file=adapter.source_path,
        module=module.path,
        hint="is this adapter for another base model?",
    )


def _check_shape(
    module: LoraModule, kind: ModuleKind, shape: tuple[int, ...], adapter: Adapter
) -> None:
    a, b = module.lora_A.shape, module.lora_B.shape
    if kind is ModuleKind.LINEAR:
        expected: tuple[int, ...] = (b[0], a[1])
    elif kind in (ModuleKind.CONV1D, ModuleKind.EMBEDDING):
        expected = (a[1], b[0])
    else:
        expected = (b[0], *a[1:])
        if any(size != 1 for size in b[2:]):
            raise ShapeMismatchError(
                f"conv lora_B must have a 1x..x1 kernel, got {list(b)}",
                file=adapter.source_path,
                module=module.path,
            )
    if tuple(shape) != expected:
        raise ShapeMismatchError(
            f"the base weight is {list(shape)} but the adapter's update is {list(expected)}",
            file=adapter.source_path,
            module=module.path,
            hint="this adapter was trained for another base model",
        )


def _wrapped_parameters(path: str, adapter: Adapter, architecture: Architecture) -> list[str]:
    """The parameters of module `path` PEFT wraps for target_parameters, innermost first (PEFT
    nests one wrapper per parameter in the module's registration order)."""
    targets = adapter.source_config.get("target_parameters") or []
    info = architecture.modules.get(path)
    if not targets or info is None:
        return []
    names = []
    for name in info.parameters:
        key = f"{path}.{name}"
        if any(key == t or key.endswith("." + t) for t in targets if isinstance(t, str)):
            names.append(name)
    return names


def _fit_parameter(
    module: LoraModule,
    path: str,
    depth: int,
    wrapped: list[str],
    adapter: Adapter,
    architecture: Architecture,
) -> tuple[LoraModule, Target]:
    if depth >= len(wrapped):
        raise FormatError(
            f"wraps a parameter of {path}, but target_parameters matches only "
            f"{len(wrapped)} parameter(s) there",
            file=adapter.source_path,
            module=module.path,
            hint="is this adapter for another base model?",
        )
    name = wrapped[len(wrapped) - 1 - depth]
    param = f"{path}.{name}"
    shape = architecture.parameters[param]
    info = architecture.modules[path]
    if len(shape) == 3:
        experts = shape[0]
        out_features, in_features = (
            (shape[2], shape[1]) if info.experts_transposed else (shape[1], shape[2])
        )
    elif len(shape) == 2:
        experts, (out_features, in_features) = 1, shape
    else:
        raise FormatError(
            f"wraps {param} of shape {list(shape)}; LoRA takes 2-D or 3-D parameters",
            file=adapter.source_path,
            module=module.path,
        )
    rows, columns = module.lora_A.shape[0], module.lora_B.shape[1]
    a_in, b_out = module.lora_A.shape[1], module.lora_B.shape[0]
    if rows % experts or (a_in, b_out) != (in_features, out_features) or columns != rows:
        raise ShapeMismatchError(
            f"A {list(module.lora_A.shape)} and B {list(module.lora_B.shape)} do not fit "
            f"{param} of shape {list(shape)} ({experts} expert(s) of {out_features} x "
            f"{in_features})",
            file=adapter.source_path,
            module=module.path,
            hint="is this adapter for another base model?",
        )
    alpha, rank = _pattern_values(adapter, param, module.alpha)
    resolved = replace(
        module, kind=ModuleKind.PARAMETER, parameter=name, experts=experts, alpha=alpha
    )
    _check_rank(resolved, rank, adapter)
    target = Target(module.path, param, ModuleKind.PARAMETER, shape, info.experts_transposed)
    return resolved, target


def _check_rank(module: LoraModule, rank: int | None, adapter: Adapter) -> None:
    if rank is not None and module.r != rank:
        stack = f" ({module.experts} experts of rank {module.r})" if module.experts > 1 else ""
        raise FormatError(
            f"the config gives rank {rank} but the tensors have rank {module.r}{stack}",
            file=adapter.source_path,
            module=module.path,
            hint="fix r or rank_pattern in adapter_config.json",
        )


def _pattern_values(adapter: Adapter, key: str, alpha: float) -> tuple[float, int | None]:
    """alpha and rank PEFT gives the wrapped parameter `key` (patterns match its path)."""
    config = adapter.source_config
    alphas = config.get("alpha_pattern") or {}
    ranks = config.get("rank_pattern") or {}
    found = match_pattern(alphas, key)
    if found is not None:
        alpha = float(alphas[found])
    elif "lora_alpha" in config:
        alpha = float(config["lora_alpha"])
    found = match_pattern(ranks, key)
    rank = ranks[found] if found is not None else config.get("r")
    return alpha, int(rank) if isinstance(rank, (int, float)) else None
