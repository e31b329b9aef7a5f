"""kohya module names: their prefixes, the module paths they stand for (exact for Stable
Diffusion components, a best guess for one model) and the record of them kept for writing."""

from __future__ import annotations

import json
import re
from pathlib import Path

from loramerge.adapter import LoraModule
from loramerge.errors import FormatError
from loramerge.formats import sd_names
from loramerge.formats.components import keyed

PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_")
DEFAULT_PREFIX = "lora_te_"
# Underscored words that are single components of common module paths; the rest of a kohya name
# splits at every underscore. Exact names come from the base model when one is given.
_COMPOUNDS = (
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "out_proj",
    "qkv_proj",
    "gate_up_proj",
    "embed_tokens",
    "lm_head",
    "c_attn",
    "c_proj",
    "c_fc",
    "text_model",
    "input_layernorm",
    "post_attention_layernorm",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "query_key_value",
    "word_embeddings",
    "transformer_blocks",
    "down_blocks",
    "up_blocks",
    "mid_block",
    "proj_in",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "time_emb_proj",
    "conv_shortcut",
    "block_sparse_moe",
    "shared_expert",
)

# Adapter.metadata key written by the readers of kohya-style files (never written to outputs)
NAMES_KEY = "loramerge.kohya_names"  # JSON {"<component>.<path>": the source's kohya name}
_SD_VERSIONS = ("sd_", "sdxl", "sd3", "flux")


def strip_prefix(name: str) -> tuple[str, str]:
    """(prefix, rest) of a kohya module name."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return prefix, name[len(prefix) :]
    return "", name


def kohya_to_path(name: str) -> str:
    """A best guess of the dotted module path; merges re-resolve it against the base's names."""
    _, rest = strip_prefix(name)
    protected = rest
    for index, word in enumerate(sorted(_COMPOUNDS, key=len, reverse=True)):
        protected = re.sub(rf"(?<![A-Za-z0-9]){word}(?![A-Za-z])", f"\0{index}\0", protected)
    dotted = protected.replace("_", ".")
    ordered = sorted(_COMPOUNDS, key=len, reverse=True)
    return re.sub(r"\x00(\d+)\x00", lambda m: ordered[int(m.group(1))], dotted)


def path_to_kohya(path: str, prefix: str = DEFAULT_PREFIX) -> str:
    return prefix + path.replace(".", "_")


def is_stable_diffusion(names: list[str], metadata: dict[str, str]) -> bool:
    """Whether a kohya-style file adapts a diffusion pipeline (its `lora_te_` modules are then
    the text encoder's) rather than one model that kohya's default prefix was written for."""
    prefixes = {sd_names.split_kohya_name(name)[0] for name in names}
    if prefixes & {"lora_unet", "lora_te1", "lora_te2", "lora_te3"}:
        return True
    version = metadata.get("ss_base_model_version", "")
    if version.startswith(_SD_VERSIONS) or "ss_v2" in metadata:
        return True
    rests = [sd_names.split_kohya_name(n)[2] for n in names if n.startswith("lora_te_")]
    return bool(rests) and all(sd_names.kohya_module_path("text_encoder", rest) for rest in rests)


def resolve_names(names: list[str], metadata: dict[str, str]) -> dict[str, tuple[str | None, str]]:
    """(component, module path) of each kohya module name: exact where the component's
    architecture names are known (SD UNets, CLIP text encoders), a best guess otherwise."""
    stable_diffusion = is_stable_diffusion(names, metadata)
    resolved = {}
    for name in names:
        _, component, rest = sd_names.split_kohya_name(name)
        if not stable_diffusion:
            component = None
        path = sd_names.kohya_module_path(component, rest) if component else None
        resolved[name] = (component, path or kohya_to_path(name))
    return resolved


def name_notes(names: dict[str, tuple[str | None, str]]) -> list[str]:
    """Notes on a kohya-style file's components and how its module paths were found."""
    notes = []
    counts: dict[str, int] = {}
    for component, _ in names.values():
        counts[component or "one model"] = counts.get(component or "one model", 0) + 1
    if None not in {c for c, _ in names.values()}:
        notes.append("components " + ", ".join(f"{c} ({n})" for c, n in counts.items()))
    guessed = [
        name
        for name, (component, _) in names.items()
        if component is None
        or not sd_names.kohya_module_path(component, sd_names.split_kohya_name(name)[2])
    ]
    ldm = any(
        c == "unet" and sd_names.is_ldm_unet_name(sd_names.split_kohya_name(n)[2])
        for n, (c, _) in names.items()
    )
    if guessed:
        notes.append(
            f"{len(guessed)} of {len(names)} module paths guessed from common layer names "
            "(exact against the base model)"
        )
    else:
        notes.append(
            "module paths from the architecture's own names"
            + (" (original LDM UNet names mapped to diffusers paths)" if ldm else "")
        )
    return notes


def keyed_once(
    path: Path, modules: list[LoraModule], names: dict[str, tuple[str | None, str]]
) -> dict[str, LoraModule]:
    """Modules keyed as an Adapter keys them; two kohya names for one module are refused."""
    seen: dict[tuple[str | None, str], str] = {}
    for name, where in names.items():
        if where in seen:
            raise FormatError(
                f"names {seen[where]} and {name} are the same module {where[1]}", file=path
            )
        seen[where] = name
    return keyed(modules)


def names_record(names: dict[str, tuple[str | None, str]]) -> str:
    """JSON for NAMES_KEY: each module's kohya name in the source, by `<component>.<path>`."""
    return json.dumps({f"{component}.{path}": name for name, (component, path) in names.items()})
