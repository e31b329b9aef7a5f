"""What the base model's own architecture says, asked of transformers instead of guessed.

The model class named by config.json is built on the meta device (no weights are read, almost no
memory) and asked, per module and parameter: its type (Linear, transformers' Conv1D, Embedding,
Conv1d/2d/3d, or a bare parameter such as a 3-D stack of MoE experts), which parameters are tied
to which, and where each in-memory parameter is stored in the files (loramerge.model.stored_layout).
Remote code is never run: a model that needs it, or one transformers cannot build, gets no
Architecture, and the caller falls back to name-based rules and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from loramerge.adapter import ModuleKind
from loramerge.model.stored_layout import (
    StoredLayout,
    StoredPiece,
    UnmappedLayout,
    stored_layout,
    whole_piece,
)


@dataclass(frozen=True)
class ModuleInfo:
    """One module of the model: its kind for LoRA purposes and its own parameters, in the order
    the module registers them (PEFT nests one wrapper per targeted parameter in that order)."""

    path: str
    kind: ModuleKind | None  # None: a module PEFT's LoRA does not wrap as a layer
    parameters: tuple[str, ...]
    experts_transposed: bool = False  # its 3-D expert stacks are (E, in, out), not (E, out, in)


@dataclass
class Architecture:
    """The answers of one model class, in in-memory names (PEFT's names)."""

    model_class: str
    base_model_prefix: str
    modules: dict[str, ModuleInfo]
    parameters: dict[str, tuple[int, ...]]  # every parameter name, tied ones included
    tied: dict[str, str]  # target parameter -> the parameter it is tied to
    # where each parameter is stored, as transformers' conversion rules say (loramerge.model.
    # stored_layout): its pieces, or why they are not mapped; None: stored as held in memory
    pieces: dict[str, tuple[StoredPiece, ...] | str] | None = field(default=None, repr=False)

    def stored_pieces(self, param: str) -> list[StoredPiece]:
        """Where `param` lives in the files (names before the base-model prefix is matched);
        raises UnmappedLayout when transformers converts it in a way loramerge does not map."""
        shape = self.parameters[param]
        if self.pieces is None:
            return [whole_piece(param, shape)]
        found = self.pieces[param]
        if isinstance(found, str):
            raise UnmappedLayout(found)
        return list(found)


@dataclass(frozen=True)
class NoArchitecture:
    """Why the architecture could not be asked: the merge falls back to name-based rules."""

    reason: str


def _kind_of(module: Any) -> ModuleKind | None:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Embedding):
        return ModuleKind.EMBEDDING
    if isinstance(module, Conv1D):
        return ModuleKind.CONV1D
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ModuleKind.CONV
    if isinstance(module, nn.Linear):
        return ModuleKind.LINEAR
    return None


def _model_class(config: dict[str, Any]) -> tuple[Any, Any] | NoArchitecture:
    """(transformers config object, model class) for a config.json, without remote code."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        if config.get("auto_map"):
            return NoArchitecture(
                f"model_type {model_type!r} needs trust_remote_code, and loramerge never runs "
                "code from a model folder"
            )
        return NoArchitecture(f"transformers does not know model_type {model_type!r}")
    names = config.get("architectures") or []
    if not names:
        return NoArchitecture("config.json names no model class (its 'architectures' is empty)")
    model_class = getattr(transformers, str(names[0]), None)
    if model_class is None:
        return NoArchitecture(f"transformers has no model class {names[0]}")
    settings = {k: v for k, v in config.items() if k != "auto_map"}
    try:
        hf_config = CONFIG_MAPPING[model_type].from_dict(settings)
    except Exception as exc:  # a config transformers refuses: report it, fall back
        return NoArchitecture(f"transformers cannot read config.json ({type(exc).__name__}: {exc})")
    return hf_config, model_class


def build_architecture(config: dict[str, Any]) -> Architecture | NoArchitecture:
    """The Architecture of the model a config.json describes (the model built on meta)."""
    import torch

    from loramerge.model.hf_runtime import quiet_transformers

    with quiet_transformers():
        found = _model_class(config)
        if isinstance(found, NoArchitecture):
            return found
        hf_config, model_class = found
        try:
            with torch.device("meta"):
                model = model_class._from_config(hf_config)
            layout = stored_layout(model)
        except Exception as exc:  # transformers could not build it: fall back, saying why
            return NoArchitecture(
                f"transformers cannot build {model_class.__name__} ({type(exc).__name__}: {exc})"
            )
    modules = {
        name: ModuleInfo(
            name,
            _kind_of(module),
            tuple(n for n, _ in module.named_parameters(recurse=False)),
            bool(getattr(module, "is_transposed", False)),
        )
        for name, module in model.named_modules(remove_duplicate=False)
    }
    parameters = {
        name: tuple(param.shape) for name, param in model.named_parameters(remove_duplicate=False)
    }
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return Architecture(
        model_class=model_class.__name__,
        base_model_prefix=getattr(model, "base_model_prefix", "") or "",
        modules=modules,
        parameters=parameters,
        tied={k: v for k, v in tied.items() if k in parameters and v in parameters},
        pieces=_all_pieces(layout, parameters),
    )


def _all_pieces(
    layout: StoredLayout | None, parameters: dict[str, tuple[int, ...]]
) -> dict[str, tuple[StoredPiece, ...] | str] | None:
    """Every parameter's stored pieces, or why transformers' conversion is not mapped."""
    if layout is None:
        return None
    found: dict[str, tuple[StoredPiece, ...] | str] = {}
    for param, shape in parameters.items():
        try:
            found[param] = tuple(layout.pieces(param, shape))
        except UnmappedLayout as exc:
            found[param] = str(exc)
    return found


def side_effects(config: dict[str, Any], updates: dict[str, Any]) -> set[str]:
    """Settings of the model's transformers config that change when `updates` (dotted keys for
    sub-configs) are applied to config.json, other than the updated keys themselves: some
    configs give a field another meaning (T5 reads `tie_word_embeddings` as whether to scale its
    decoder outputs, and always ties)."""
    from loramerge.model.param_changes import apply_config_updates

    def settings(values: dict[str, Any]) -> dict[str, Any]:
        found = _model_class(values)
        if isinstance(found, NoArchitecture):
            return {}
        return _flatten(found[0].to_dict())

    before = settings(config)
    after = settings(apply_config_updates(config, updates))
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return changed - set(updates) - {"transformers_version"}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def architecture_of(config: dict[str, Any]) -> Architecture | NoArchitecture:
    """The architecture a base's config.json describes: asked of transformers once per config
    and versions (kept on disk), and once per config in a process."""
    if not config:
        return NoArchitecture("the base has no config.json")
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = _kept_or_built(config)
    return _CACHE[key]


def _kept_or_built(config: dict[str, Any]) -> Architecture | NoArchitecture:
    """The answer kept from an earlier run (loramerge.model.architecture_cache), else asked of
    transformers now and kept."""
    from loramerge.model import architecture_cache

    found = architecture_cache.load(config)
    if found is None:
        found = build_architecture(config)
        architecture_cache.store(config, found)
    return found


_CACHE: dict[str, Architecture | NoArchitecture] = {}
