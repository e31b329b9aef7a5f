"""Writing diffusers LoRA files: `pytorch_lora_weights.safetensors` in PEFT's key layout with
`lora_adapter_metadata`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loramerge import __version__
from loramerge.adapter import Adapter, LoraModule, ModuleKind
from loramerge.errors import FormatError, opt
from loramerge.formats.diffusers_keys import WEIGHT_NAME
from loramerge.formats.diffusers_metadata import METADATA_KEY, config_for
from loramerge.formats.sd_names import COMPONENT_ORDER
from loramerge.io.safetensors_writer import save_tensors


def _peft_magnitude(module: LoraModule) -> Any:
    """A DoRA magnitude as PEFT stores it: (out,) for Linear, (1, out, 1, ...) for convs."""
    magnitude = module.magnitude.load().reshape(-1)
    if module.kind is ModuleKind.CONV:
        ones = (1,) * (len(module.lora_A.shape) - 2)
        magnitude = magnitude.reshape(1, -1, *ones)
    return magnitude.contiguous()


def write(adapter: Adapter, folder: Path) -> None:
    """`<folder>/pytorch_lora_weights.safetensors` in PEFT's key layout (one layout per file:
    diffusers 0.42 reads the layout of the first key only) with `lora_adapter_metadata`."""
    refused = [
        m.path
        for m in adapter.modules.values()
        if m.kind not in (ModuleKind.LINEAR, ModuleKind.CONV)
    ]
    if refused or adapter.modules_to_save or adapter.base_tables:
        what = refused[0] if refused else "modules_to_save or saved embedding tables"
        raise FormatError(
            f"diffusers LoRA files hold linear and conv LoRA only, not {what}",
            file=adapter.source_path,
            hint=f"write a PEFT adapter instead ({opt('to')} peft)",
        )
    orphans = [m.path for m in adapter.modules.values() if m.component is None]
    if orphans:
        raise FormatError(
            f"diffusers LoRA files name each module's pipeline component, and this adapter's "
            f"modules have none (e.g. {orphans[0]})",
            file=adapter.source_path,
            hint=f"say which model it adapts with {opt('component')} (unet, text_encoder, ...)",
        )
    by_component: dict[str, list[LoraModule]] = {}
    for module in adapter.modules.values():
        by_component.setdefault(module.component or "", []).append(module)
    flat: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for component in sorted(by_component, key=COMPONENT_ORDER.index):
        modules = by_component[component]
        for field, value in config_for(component, modules).items():
            flat[f"{component}.{field}"] = value
        for module in modules:
            stem = f"{component}.{module.path}"
            tensors[f"{stem}.lora_A.weight"] = module.lora_A.load().contiguous()
            tensors[f"{stem}.lora_B.weight"] = module.lora_B.load().contiguous()
            if module.magnitude is not None:
                # with `.weight`: diffusers 0.42 + transformers 5 load text encoders through
                # transformers' own key mapping, which drops a bare lora_magnitude_vector
                tensors[f"{stem}.lora_magnitude_vector.weight"] = _peft_magnitude(module)
            if module.bias is not None:
                tensors[f"{stem}.lora_B.bias"] = module.bias.load().contiguous()
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True),
        "loramerge.version": __version__,
    }
    save_tensors(folder / WEIGHT_NAME, tensors, metadata)
