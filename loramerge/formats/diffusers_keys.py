"""The keys of diffusers' LoRA files: the weights file's name and the `<component>.<module path>`
keys in their layouts (PEFT's, diffusers' converted ones, the attention processors' of
diffusers < 0.21)."""

from __future__ import annotations

import re
from pathlib import Path

from loramerge.formats.sd_names import COMPONENT_ORDER

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COMPONENTS = frozenset(COMPONENT_ORDER)
# (suffix, part, layout): PEFT's keys (diffusers' own since 0.2x); the attention keys that
# convert_state_dict_to_diffusers writes for the UNet and for text encoders; DoRA, lora bias
# and the network alphas of files without metadata
_SUFFIXES = (
    (".lora_A.weight", "A", "PEFT lora_A/lora_B"),
    (".lora_B.weight", "B", "PEFT lora_A/lora_B"),
    (".lora.down.weight", "A", "diffusers lora.down/lora.up"),
    (".lora.up.weight", "B", "diffusers lora.down/lora.up"),
    (".lora_linear_layer.down.weight", "A", "text encoder lora_linear_layer.down/up"),
    (".lora_linear_layer.up.weight", "B", "text encoder lora_linear_layer.down/up"),
    (".lora_magnitude_vector.weight", "magnitude", "PEFT lora_A/lora_B"),
    (".lora_magnitude_vector", "magnitude", "PEFT lora_A/lora_B"),
    (".lora_B.bias", "bias", "PEFT lora_A/lora_B"),
    (".alpha", "alpha", "network alphas"),
)
# the attention-processor keys of diffusers < 0.21 (`attn1.processor.to_q_lora.down.weight`)
_PROCESSOR = re.compile(
    r"^(?P<stem>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)


def parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(component, module path, part, layout) of a diffusers LoRA key, or None."""
    component, _, rest = key.partition(".")
    if component not in COMPONENTS or not rest:
        return None
    found = _PROCESSOR.match(rest)
    if found:
        proj = found["proj"] + (".0" if found["proj"] == "to_out" else "")
        part = "A" if found["part"] == "down" else "B"
        return component, f"{found['stem']}.{proj}", part, "attention processor (diffusers < 0.21)"
    for suffix, part, layout in _SUFFIXES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return component, rest[: -len(suffix)], part, layout
    return None


def weights_file(path: Path) -> Path | None:
    if path.is_dir():
        candidate = path / WEIGHT_NAME
        return candidate if candidate.is_file() else None
    return path if path.suffix == ".safetensors" and path.is_file() else None
