"""What a reader read: the tool that wrote the adapter, its algorithm and the scale rule applied,
kept in Adapter.metadata under `loramerge.read.*` so that `inspect` and `convert` can say it."""

from __future__ import annotations

from collections.abc import Mapping

from loramerge.adapter import Adapter

PREFIX = "loramerge.read."  # the keys of kohya.READ_TOOL, READ_ALGORITHM, READ_RULE, READ_NOTES
TOOL = PREFIX + "tool"
ALGORITHM = PREFIX + "algorithm"
RULE = PREFIX + "rule"
NOTES = PREFIX + "notes"

# Readers that record nothing themselves: what they read, by Adapter.source_format. Their
# metadata is the file's own header, so keys found there are not trusted.
_KNOWN: dict[str, dict[str, str]] = {
    "peft": {
        "tool": "PEFT",
        "algorithm": "LoRA (DoRA when magnitudes are saved)",
        "rule": "scale lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; r and alpha per "
        "module from rank_pattern / alpha_pattern",
    },
    "dylora": {
        "tool": "DyLoRA (official loralib checkpoint)",
        "algorithm": "DyLoRA: nested ranks, any prefix b is a LoRA",
        "rule": "scale alpha / b at rank b; alpha given by the user (the file stores none)",
    },
    "gguf": {
        "tool": "llama.cpp",
        "algorithm": "LoRA GGUF (q/k rows in llama.cpp's order are restored)",
        "rule": "scale adapter.lora.alpha / r (1 when no alpha is stored)",
    },
}


def stamp(
    metadata: Mapping[str, str], tool: str, algorithm: str, rule: str, notes: str = ""
) -> dict[str, str]:
    """`metadata` with this reader's account set (any `loramerge.read.*` keys of the file
    dropped)."""
    stamped = {k: v for k, v in metadata.items() if not k.startswith(PREFIX)}
    stamped.update({TOOL: tool, ALGORITHM: algorithm, RULE: rule})
    if notes:
        stamped[NOTES] = notes
    return stamped


def read_as(adapter: Adapter) -> dict[str, str]:
    """What the reader read ({tool, algorithm, rule[, notes]}); empty when nothing is known."""
    known = _KNOWN.get(adapter.source_format)
    if known is not None:
        return dict(known)
    return {
        key.removeprefix(PREFIX): adapter.metadata[key]
        for key in (TOOL, ALGORITHM, RULE, NOTES)
        if key in adapter.metadata
    }
