"""mlx-lm adapter folders written (loramerge.formats.mlx_lm reads them and says what mlx-lm
expects). The writer gives every module one rank (zero-padded: exact) and one scale (other
scales folded into B), and lists every module by its whole path in `keys`, so mlx-lm adapts
exactly those.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import Adapter, ModuleKind
from loramerge.errors import FormatError, opt
from loramerge.formats.mlx_lm import CONFIG_NAME, WEIGHTS_NAME
from loramerge.io.safetensors_writer import save_tensors


def _refuse(adapter: Adapter, what: str, example: str) -> FormatError:
    return FormatError(
        f"mlx-lm adapters cannot hold {what} (e.g. {example})",
        file=adapter.source_path,
        hint=f"write a PEFT adapter instead ({opt('to')} peft)",
    )


def config_and_tensors(adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    modules = list(adapter.modules.values())
    if not modules:
        raise FormatError("holds no LoRA modules", file=adapter.source_path)
    if adapter.modules_to_save or adapter.base_tables:
        name = next(iter(adapter.modules_to_save or adapter.base_tables))
        raise _refuse(adapter, "full trained tensors (modules_to_save)", name)
    for module in modules:
        if module.bias is not None:
            raise _refuse(adapter, "LoRA biases", module.path)
        if module.kind is ModuleKind.CONV:
            raise _refuse(adapter, "convolution LoRA", module.path)
        if module.kind is ModuleKind.EMBEDDING and module.magnitude is not None:
            raise _refuse(adapter, "DoRA on embeddings", module.path)
    dora = {m.magnitude is not None for m in modules}
    if len(dora) > 1:
        example = next(m.path for m in modules if m.magnitude is None)
        raise _refuse(adapter, "DoRA and plain LoRA modules together", example)
    rank = max(m.r for m in modules)
    scales = Counter(m.scale for m in modules)
    scale = max(scales, key=lambda s: (scales[s], s))
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        lora_b, lora_a = module.lora_B.load(), module.lora_A.load()
        if module.scale != scale:  # one scale for the whole adapter: fold the ratio into B
            lora_b = (lora_b.float() * (module.scale / scale)).to(lora_b.dtype)
        pad = rank - module.r
        if pad:  # one rank for the whole adapter: zero rows and columns change nothing
            lora_a = torch.cat([lora_a, lora_a.new_zeros(pad, lora_a.shape[1])])
            lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], pad)], dim=1)
        tensors[f"{module.path}.lora_a"] = lora_a.T.contiguous()
        tensors[f"{module.path}.lora_b"] = lora_b.T.contiguous()
        if module.magnitude is not None:
            tensors[f"{module.path}.m"] = module.magnitude.load().contiguous()
    config: dict[str, Any] = {
        "fine_tune_type": "dora" if dora == {True} else "lora",
        # every module is named by its whole path in keys, which mlx-lm matches against the
        # model's module paths; the blocks num_layers selects match none of them
        "num_layers": -1,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": 0.0,
            "keys": sorted(m.path for m in modules),
        },
    }
    if adapter.base_model:
        config["model"] = adapter.base_model
    return config, tensors


def write(adapter: Adapter, folder: Path) -> None:
    """Write an mlx-lm adapter folder into an existing (empty, temporary) folder."""
    config, tensors = config_and_tensors(adapter)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=4, sort_keys=True) + "\n")
    save_tensors(folder / WEIGHTS_NAME, tensors, {"format": "mlx"})
