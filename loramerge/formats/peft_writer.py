"""PEFT adapter folders written: `adapter_config.json` + `adapter_model.safetensors`, with PEFT's
saved names (loramerge.formats.peft reads them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loramerge import __version__
from loramerge.adapter import Adapter, ModuleKind
from loramerge.formats.peft import CONFIG_NAME, PREFIX, TOKEN_DELTA, WEIGHT_NAMES, WRAPPED
from loramerge.formats.peft_config import KASA, config_for
from loramerge.io.safetensors_writer import save_tensors


def state_dict_for(adapter: Adapter) -> dict[str, Any]:
    """PEFT's saved keys: `base_model.model.` prefix, no adapter name."""
    tensors = {}
    for module in adapter.modules.values():
        stem = PREFIX + module.path
        if module.kind is ModuleKind.EMBEDDING:
            tensors[f"{stem}.lora_embedding_A"] = module.lora_A.load()
            tensors[f"{stem}.lora_embedding_B"] = module.lora_B.load()
        else:
            tensors[f"{stem}.lora_A.weight"] = module.lora_A.load()
            tensors[f"{stem}.lora_B.weight"] = module.lora_B.load()
        if module.magnitude is not None:
            magnitude = module.magnitude.load()
            if module.kind is ModuleKind.CONV:  # PEFT keeps a conv's as (1, out, 1, ...)
                spatial = len(module.lora_A.shape) - 2
                magnitude = magnitude.reshape(1, -1, *([1] * spatial))
            tensors[f"{stem}.lora_magnitude_vector"] = magnitude
        if module.bias is not None:
            tensors[f"{stem}.lora_B.bias"] = module.bias.load()
        if adapter.base_init == KASA:
            # B already holds KaSA's diagonal (B diag(d)): PEFT scales it by ones
            import torch

            tensors[f"{stem}.lora_diag"] = torch.ones(module.r, dtype=module.lora_B.dtype)
    for name, tensor in adapter.modules_to_save.items():
        tensors[PREFIX + name] = tensor.load()
    for name, tensor in adapter.base_tables.items():
        tensors[PREFIX + name.removesuffix(".weight") + WRAPPED + ".weight"] = tensor.load()
    wrapped = {m.path for m in adapter.modules.values()}
    for name, tensor in adapter.saved_biases.items():
        module = name.removesuffix(".bias")
        stem = module + WRAPPED if module in wrapped else module
        tensors[f"{PREFIX}{stem}.bias"] = tensor.load()
    for module, rows in adapter.token_rows.items():
        tensors[PREFIX + module + TOKEN_DELTA] = rows.values.load()
    return {k: v.contiguous() for k, v in tensors.items()}


def write(adapter: Adapter, folder: Path) -> None:
    """Write a PEFT adapter folder into an existing (empty, temporary) folder."""
    config = config_for(adapter)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    metadata = {"format": "pt", "loramerge.version": __version__}
    save_tensors(folder / WEIGHT_NAMES[0], state_dict_for(adapter), metadata)
