"""Adapters for several models of one pipeline against their base: the folder of each component
(`<pipeline>/unet`, ...), module names pinned per component, base weights for LyCORIS DoRA."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from loramerge.adapter import Adapter, LoraModule
from loramerge.errors import FormatError, OptionError, opt
from loramerge.formats import components
from loramerge.formats.sd_names import COMPONENT_ORDER
from loramerge.model.folder import base_config_of, open_base, resolve_base
from loramerge.model.names import resolve_tensor_name
from loramerge.model.rename import rename_to_base

if TYPE_CHECKING:  # torch-heavy modules load when used: a plain merge plans without torch
    import torch

# formats.lycoris.DORA_KEY (that module imports torch): which modules hold LyCORIS DoRA
LYCORIS_DORA_KEY = "loramerge.lycoris_dora"


def component_root(base: str | Path, component: str | None) -> Path:
    """The model folder of a component: `<base>/<component>` in a diffusers pipeline folder,
    else the base itself (a folder holding one model)."""
    root = resolve_base(base)
    if component is not None and (root / component).is_dir():
        return root / component
    if is_pipeline(root):
        raise FormatError(
            f"is a diffusers pipeline without a {component or 'model'} folder",
            file=root,
            hint="pass the folder of the model the adapter is for",
        )
    return root


def is_pipeline(base: str | Path) -> bool:
    """Whether a base is a diffusers pipeline folder: a model_index.json, or no config.json
    of its own beside component folders (`unet/`, `text_encoder/`, ...)."""
    root = resolve_base(base)
    if (root / "model_index.json").is_file():
        return True
    return not (root / "config.json").is_file() and any(
        (root / name).is_dir() for name in COMPONENT_ORDER
    )


def model_config(base: str | Path) -> dict | None:
    """The base's config.json, or None for a diffusers pipeline folder (one per component)."""
    return None if is_pipeline(base) else base_config_of(resolve_base(base))


def fit_components(adapter: Adapter, base: str | Path) -> Adapter:
    """Module paths pinned to the base's own tensor names, component by component."""
    parts = components.split(adapter)
    if list(parts) == [None]:  # one model: the whole adapter fitted (tables, initialisation)
        return rename_to_base(adapter, component_root(base, None))
    fitted: list[LoraModule] = []
    for component, part in parts.items():
        fitted += rename_to_base(part, component_root(base, component)).modules.values()
    return replace(adapter, modules=components.keyed(fitted))


def base_weights(base: str | Path) -> Callable[[str, LoraModule], torch.Tensor]:
    """A reader of each module's base weight (for folding LyCORIS's DoRA eps)."""
    from loramerge.io.safetensors_reader import SafetensorsReader

    models: dict[str | None, tuple[Path, dict[str, str]]] = {}

    def weight(key: str, module: LoraModule) -> torch.Tensor:
        if module.component not in models:
            folder = open_base(component_root(base, module.component))
            located = {e.name: shard for shard, e in folder.tensors()}
            models[module.component] = (folder.root, located)
        root, located = models[module.component]
        name = resolve_tensor_name(module.path + ".weight", located)
        if name is None:
            raise FormatError(
                f"the base model has no tensor for module {module.path}",
                file=root,
                module=key,
                hint="is this adapter for another base model?",
            )
        with SafetensorsReader(root / located[name]) as reader:
            return reader.read(name)

    return weight


def refuse_merge_only(adapter: Adapter) -> None:
    """`convert` writes LoRAs: a module whose exact LoRA form is a dense update is refused."""
    from loramerge.formats.derived_factors import merge_only_modules

    found = merge_only_modules(adapter)
    if found:
        key, reason = next(iter(found.items()))
        raise OptionError(
            f"{len(found)} of {len(adapter.modules)} modules have no low-rank form, e.g. "
            f"{key}: {reason}",
            file=adapter.source_path,
            hint=f"`loramerge merge` applies them exactly; {opt('max_rank')} K (or "
            f"{opt('energy')}) writes a LoRA of rank at most K and reports the error it costs",
        )


def fold_lycoris_dora(adapter: Adapter, base: str | Path | None, what: str) -> Adapter:
    """LyCORIS DoRA magnitudes turned into PEFT ones against the base (needs it)."""
    if LYCORIS_DORA_KEY not in adapter.metadata:
        return adapter
    from loramerge.formats import lycoris

    if not lycoris.needs_dora_fold(adapter):
        return adapter
    if base is None:
        raise OptionError(
            f"has LyCORIS DoRA modules: LyCORIS divides each output row by ||V|| + eps, PEFT "
            f"by ||V||; the magnitudes that make them equal depend on the base weights, so "
            f"{what} needs {opt('base')}",
            file=adapter.source_path,
        )
    return lycoris.fold_dora_epsilon(adapter, base_weights(base))


def one_model(
    adapter: Adapter, base: str | Path, component: str | None, what: str
) -> tuple[Adapter, Path]:
    """The adapter of the one model a merge writes, and that model's folder. A pipeline
    adapter's model is `component`, or the one the base folder is named after (`.../unet`)."""
    adapter = components.for_component(adapter, component)
    found = components.components(adapter)
    if len(found) > 1:
        name = resolve_base(base).name
        adapter = components.select(adapter, name if name in found else None)
    root = component_root(base, components.components(adapter)[0])
    return fold_lycoris_dora(adapter, root, what), root
