"""The header of a kohya-style `.safetensors` file (kohya, kohya DyLoRA, LyCORIS) and which of
those formats its keys and metadata speak for."""

from __future__ import annotations

import re
from pathlib import Path

from loramerge.errors import FormatError
from loramerge.io.safetensors_header import SafetensorsHeader, read_header

ANY_KEY = re.compile(r"^(?P<name>lora_[A-Za-z0-9_]+)\.(?P<part>.+)$")
# Tensor parts that only LyCORIS writes: LoHa, LoKr, full, Tucker LoCon, DoRA, and the methods it
# cannot turn into a LoRA (OFT/BOFT, GLoRA, IA3, norm). LoCon itself uses kohya's own parts.
LYCORIS_PARTS = frozenset(
    {
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1",
        "lokr_t2", "diff", "diff_b", "lora_mid.weight", "dora_scale", "oft_blocks", "oft_diag",
        "rescale", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "w_norm", "b_norm",
        "on_input", "weight",
    }
)  # fmt: skip


def header_of(path: Path) -> SafetensorsHeader | None:
    """The header of a .safetensors file, or None for anything else (sniffers never raise)."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    try:
        return read_header(path)
    except FormatError:
        return None


def evidence(header: SafetensorsHeader) -> set[str]:
    """The kohya-style formats a file's keys and `ss_network_module` speak for: `kohya`,
    `kohya-dylora`, `lycoris`. Two of them at once is a contradiction the caller refuses."""
    parts = {m["part"] for name in header.entries if (m := ANY_KEY.match(name))}
    kohya_keys = bool(parts & {"lora_down.weight", "lora_up.weight"})
    lycoris_keys = bool(parts & LYCORIS_PARTS)
    trainer = header.metadata.get("ss_network_module", "")
    found = set()
    if trainer.startswith("lycoris") or lycoris_keys:
        found.add("lycoris")
    if kohya_keys and not trainer.startswith("lycoris"):
        if trainer == "networks.dylora":
            found.add("kohya-dylora")
        elif trainer or not lycoris_keys:  # a LyCORIS file without metadata mixes LoCon keys in
            found.add("kohya")
    return found
