"""What a reader read: the tool that wrote the adapter, its algorithm and the scale rule applied,
kept in Adapter.metadata under `loramerge.read.*` so that `inspect` can say it."""

from __future__ import annotations

from collections.abc import Mapping

from loramerge.adapter import Adapter

TOOL = "loramerge.read.tool"
ALGORITHM = "loramerge.read.algorithm"
RULE = "loramerge.read.rule"
NOTES = "loramerge.read.notes"
KEYS = (TOOL, ALGORITHM, RULE, NOTES)

# Formats whose readers predate these keys: what they read, by Adapter.source_format. Their
# metadata is the file's own header, so stamps found there are not trusted.
_KNOWN: dict[str, tuple[str, str, str]] = {
    "peft": (
        "PEFT",
        "LoRA (DoRA when magnitudes are saved)",
        "scale lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; r and alpha per module "
        "from rank_pattern / alpha_pattern",
    ),
    "kohya": (
        "kohya sd-scripts",
        "LoRA (lora_down / lora_up)",
        "scale alpha / r with each module's .alpha (r when absent)",
    ),
    "dylora": (
        "DyLoRA (official loralib checkpoint)",
        "DyLoRA: nested ranks, any prefix b is a LoRA",
        "scale alpha / b at rank b; alpha supplied by the user (the checkpoint stores none)",
    ),
    "kohya-dylora": (
        "kohya sd-scripts networks.dylora",
        "DyLoRA: nested ranks in lora_down / lora_up",
        "scale alpha / b at rank b with the module's .alpha",
    ),
    "gguf": (
        "llama.cpp",
        "LoRA GGUF (q/k rows in llama.cpp's order are restored)",
        "scale adapter.lora.alpha / r (1 when no alpha is stored)",
    ),
}


def stamp(
    metadata: Mapping[str, str], tool: str, algorithm: str, rule: str, notes: str = ""
) -> dict[str, str]:
    """`metadata` with this reader's account set (any such keys from the file replaced)."""
    stamped = {k: v for k, v in metadata.items() if k not in KEYS}
    stamped.update({TOOL: tool, ALGORITHM: algorithm, RULE: rule})
    if notes:
        stamped[NOTES] = notes
    return stamped


def read_as(adapter: Adapter) -> dict[str, str]:
    """{tool, algorithm, rule[, notes]} for an adapter; empty when nothing is known."""
    known = _KNOWN.get(adapter.source_format)
    if known is not None:
        return dict(zip(("tool", "algorithm", "rule"), known, strict=True))
    found = {
        key.rsplit(".", 1)[-1]: adapter.metadata[key] for key in KEYS if key in adapter.metadata
    }
    return found if TOOL in adapter.metadata else {}
