"""`lora_adapter_metadata`, the header field where diffusers keeps each component's LoraConfig
flattened as `<component>.<field>`: read back per component, and made for the modules written."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from loramerge.adapter import LoraModule
from loramerge.errors import FormatError
from loramerge.formats.sd_names import TEXT_ENCODERS

METADATA_KEY = "lora_adapter_metadata"


def component_configs(metadata: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """`lora_adapter_metadata` unflattened: {component: {LoraConfig field: value}}."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return {}
    try:
        flat = json.loads(text)
    except json.JSONDecodeError:
        raise FormatError(f"{METADATA_KEY} is not valid JSON", file=path) from None
    if not isinstance(flat, dict):
        raise FormatError(f"{METADATA_KEY} is not a JSON object", file=path)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, name = str(key).partition(".")
        if not name:
            raise FormatError(f"{METADATA_KEY} entry {key!r} is not <component>.<field>", file=path)
        configs.setdefault(component, {})[name] = value
    return configs


def _target_name(component: str, module_path: str) -> str:
    """How the LoraConfig names a module: text-encoder paths without `text_model.`, which PEFT
    matches as a suffix of the module name whether or not transformers builds that level
    (transformers >= 5 does not for CLIPTextModel)."""
    if component in TEXT_ENCODERS and module_path.startswith("text_model."):
        return module_path[len("text_model.") :]
    return module_path


def config_for(component: str, modules: list[LoraModule]) -> dict[str, Any]:
    """The LoraConfig fields that make diffusers (through PEFT) rebuild these modules' scales."""
    rslora = {m.use_rslora for m in modules}
    if len(rslora) > 1:
        raise FormatError(
            f"the {component} modules mix rsLoRA and plain scaling, which one LoraConfig "
            "cannot express"
        )
    ranks = Counter(m.r for m in modules)
    alphas = Counter(m.alpha for m in modules)
    r = max(ranks, key=lambda v: (ranks[v], v))
    alpha = max(alphas, key=lambda v: (alphas[v], v))
    names = {m.path: re.escape(_target_name(component, m.path)) for m in modules}
    return {
        "alpha_pattern": {names[m.path]: _number(m.alpha) for m in modules if m.alpha != alpha},
        "bias": "none",
        "lora_alpha": _number(alpha),
        "lora_bias": any(m.bias is not None for m in modules),
        "lora_dropout": 0.0,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {names[m.path]: m.r for m in modules if m.r != r},
        "target_modules": sorted(_target_name(component, m.path) for m in modules),
        "use_dora": any(m.magnitude is not None for m in modules),
        "use_rslora": rslora == {True},
    }


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)
