"""kohya / sd-scripts LoRA files: one `.safetensors`, `lora_down`/`lora_up`/`alpha` per module."""

from __future__ import annotations

import math
import re
from pathlib import Path

from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind
from loramerge.errors import FormatError, opt
from loramerge.formats.common import lazy_safetensors
from loramerge.formats.kohya_detect import ANY_KEY, LYCORIS_PARTS, evidence, header_of
from loramerge.formats.kohya_names import (
    NAMES_KEY,
    keyed_once,
    kohya_to_path,
    name_notes,
    names_record,
    resolve_names,
)

_KEY = re.compile(
    r"^(?P<name>lora_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
# Adapter.metadata keys written by the readers of kohya-style files (never written to outputs)
READ_PREFIX = "loramerge.read."  # what the reader read: shown by `inspect`
READ_TOOL, READ_ALGORITHM = READ_PREFIX + "tool", READ_PREFIX + "algorithm"
READ_RULE, READ_NOTES = READ_PREFIX + "rule", READ_PREFIX + "notes"


def sniff(path: Path) -> bool:
    header = header_of(path)
    return header is not None and "kohya" in evidence(header)


def _looks_kohya(path: Path, dylora: bool) -> bool:
    header = header_of(path)
    return header is not None and ("kohya-dylora" if dylora else "kohya") in evidence(header)


def stamp(tool: str, algorithm: str, rule: str, notes: list[str]) -> dict[str, str]:
    """What a reader read, as Adapter.metadata entries `loramerge.read.{tool, algorithm, rule,
    notes}` (shown by `inspect`; never written to an output)."""
    info = {READ_TOOL: tool, READ_ALGORITHM: algorithm, READ_RULE: rule}
    if notes:
        info[READ_NOTES] = "; ".join(notes)
    return info


def read(path: Path) -> Adapter:
    tensors, metadata = lazy_safetensors(path)
    grouped: dict[str, dict[str, LazyTensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            found = ANY_KEY.match(key)
            if found and found["part"] in LYCORIS_PARTS:
                raise FormatError(
                    f"tensor {key!r} belongs to a LyCORIS method, not plain LoRA",
                    file=path,
                    hint=f"read it as LyCORIS ({opt('format')} lycoris)",
                )
            continue
        grouped.setdefault(match["name"], {})[match["part"]] = tensor
    if not grouped:
        raise FormatError("holds no kohya LoRA tensors", file=path)
    names = resolve_names(list(grouped), metadata)
    modules = [_module(path, name, parts, *names[name]) for name, parts in grouped.items()]
    trainer = metadata.get("ss_network_module", "")
    info = stamp(
        f"kohya sd-scripts ({trainer})" if trainer else "kohya-style LoRA file",
        "LoRA (lora_down / lora_up)",
        "scale alpha / r with each module's .alpha (r when absent)",
        name_notes(names),
    )
    return Adapter(
        modules=keyed_once(path, modules, names),
        base_model=metadata.get("ss_base_model_version") or metadata.get("ss_sd_model_name"),
        source_format="kohya",
        source_path=str(path),
        metadata={**metadata, **info, NAMES_KEY: names_record(names)},
    )


def _module(
    path: Path,
    name: str,
    parts: dict[str, LazyTensor],
    component: str | None = None,
    module_path: str | None = None,
) -> LoraModule:
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None:
        missing = "lora_down" if down is None else "lora_up"
        raise FormatError(f"has no {missing} tensor", file=path, module=name)
    r = down.shape[0] if down.shape else 0
    if len(down.shape) == 4 and len(up.shape) == 2 and up.shape[1] == r:
        up = _as_conv_up(up)  # LyCORIS's DyLoRA saves a conv module's up as (out, r)
    if (
        len(down.shape) not in (2, 4)
        or len(up.shape) != len(down.shape)
        or up.shape[1] != r
        or r == 0
        or any(size != 1 for size in up.shape[2:])
    ):
        raise FormatError(
            f"lora_down {list(down.shape)} and lora_up {list(up.shape)} are not LoRA factors",
            file=path,
            module=name,
        )
    alpha = stored_alpha(path, name, parts, float(r))
    kind = ModuleKind.CONV if len(down.shape) == 4 else ModuleKind.LINEAR
    return LoraModule(
        path=module_path or kohya_to_path(name),
        lora_A=down,
        lora_B=up,
        alpha=alpha,
        kind=kind,
        component=component,
    )


def _as_conv_up(up: LazyTensor) -> LazyTensor:
    shape = (*up.shape, 1, 1)
    return LazyTensor(shape, up.dtype, lambda: up.read().reshape(shape))


def stored_alpha(
    path: Path, name: str, parts: dict[str, LazyTensor], missing: float, zero: float | None = None
) -> float:
    """The `.alpha` a kohya-style file stores for a module: `missing` when it stores none,
    `zero` (when given) for a stored 0, and otherwise a positive number or refused."""
    if "alpha" not in parts:
        return missing
    if math.prod(parts["alpha"].shape) != 1:
        raise FormatError(
            f"alpha must hold one number, it has shape {list(parts['alpha'].shape)}",
            file=path,
            module=name,
        )
    alpha = float(parts["alpha"].load().reshape(-1)[0].item())
    if alpha == 0 and zero is not None:
        return zero
    if not (math.isfinite(alpha) and alpha > 0):
        raise FormatError(f"alpha must be a positive number, got {alpha}", file=path, module=name)
    return alpha
