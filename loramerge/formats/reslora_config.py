"""The official ResLoRA config (`reslora_config.json`, or a safetensors file's metadata): the
settings that decide how blocks merge, checked and typed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramerge.errors import FormatError
from loramerge.formats.common import require_positive, require_rank

# res_flag values of the official code; 0 trains plain LoRA blocks without shortcuts
RES_TYPES = {0: "none", 1: "is", 2: "bs", 3: "ms"}


@dataclass(frozen=True)
class ResLoraConfig:
    """The settings that decide the merge: rank r, alpha, shortcut type, window, LoRAs per block."""

    rank: int
    lora_alpha: float
    res_flag: int
    pre_num: int = 0  # -1 (or a large number such as the official 999) means all previous blocks
    lora_num: int = 1
    target_modules: str = ""
    merge_flag: int = 0

    @property
    def kind(self) -> str:
        return RES_TYPES[self.res_flag]

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank


def parse_config(data: Any, where: Path) -> ResLoraConfig:
    """Check and type the fields loramerge needs; the official defaults fill the optional ones."""
    if not isinstance(data, dict):
        raise FormatError("the ResLoRA config must be a JSON object", file=where)
    for key in ("rank", "lora_alpha", "res_flag"):
        if key not in data:
            raise FormatError(f"the ResLoRA config has no {key!r}", file=where)
    rank = require_rank(data["rank"], "rank", where)
    res_flag, pre_num = data["res_flag"], data.get("pre_num", 0)
    lora_num = data.get("lora_num", 1)
    if isinstance(res_flag, bool) or not isinstance(res_flag, int) or res_flag not in RES_TYPES:
        known = ", ".join(f"{flag} ({name})" for flag, name in RES_TYPES.items())
        raise FormatError(
            f"unknown res_flag {res_flag!r}; loramerge knows {known}",
            file=where,
            hint="res_flag 1 is the input shortcut, 2 the block shortcut, 3 the middle shortcut",
        )
    if isinstance(pre_num, bool) or not isinstance(pre_num, int) or pre_num < -1:
        raise FormatError(f"pre_num must be -1 or a count >= 0, got {pre_num!r}", file=where)
    if isinstance(lora_num, bool) or not isinstance(lora_num, int) or lora_num < 1:
        raise FormatError(f"lora_num must be an integer >= 1, got {lora_num!r}", file=where)
    merge_flag = data.get("merge_flag", 0)
    return ResLoraConfig(
        rank=rank,
        lora_alpha=require_positive(data["lora_alpha"], "lora_alpha", where),
        res_flag=res_flag,
        pre_num=pre_num,
        lora_num=lora_num,
        target_modules=str(data.get("target_modules", "")),
        merge_flag=merge_flag if isinstance(merge_flag, int) else 0,
    )
