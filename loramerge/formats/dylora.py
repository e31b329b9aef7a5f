"""DyLoRA checkpoints: the official loralib-style state dict and kohya `networks.dylora` files."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind
from loramerge.errors import FormatError, OptionError, UsageError, opt
from loramerge.formats import kohya
from loramerge.formats.common import lazy_weights, load_pickle_weights
from loramerge.io.safetensors_header import read_header

if TYPE_CHECKING:
    from loramerge.formats.registry import ReadOptions

OFFICIAL = "dylora"  # Adapter.source_format of official checkpoints
KOHYA = "kohya-dylora"  # Adapter.source_format of kohya DyLoRA files
LYCORIS = "lycoris-dylora"  # Adapter.source_format of LyCORIS DyLoRA files (formats/lycoris.py)
FORMATS = (OFFICIAL, KOHYA, LYCORIS)
UNIT_KEY = "dylora.unit"  # Adapter.metadata key: ranks were trained as multiples of this
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_A|lora_B)$")
# Keys that look alike but belong to other formats: ResLoRA's `.loras.<i>.lora_A`, PEFT's
# `.lora_A.weight` / `.lora_A.<adapter>.weight`, kohya's `lora_down` / `lora_up`, PEFT AdaLoRA's
# `.lora_E` (its `.lora_A` / `.lora_B` have no `.weight` either).
_FOREIGN = re.compile(
    r"(\.loras\.\d+\.lora_[AB]$)|(\.lora_[AB]\.)|(\.lora_(down|up)\.)|(\.lora_E(\.[^.]+)?$)"
)


def is_dylora(adapter: Adapter) -> bool:
    """Whether the adapter was read from a DyLoRA checkpoint (nested ranks, alpha / b scale)."""
    return adapter.source_format in FORMATS


def unit_of(adapter: Adapter) -> int:
    """The rank step DyLoRA trained (ranks are multiples of it); 1 when nothing says otherwise."""
    return int(adapter.metadata.get(UNIT_KEY, "1"))


# ---------------------------------------------------------------- official (loralib style)


def official_weights(path: Path) -> Path | None:
    """The weights file of an official checkpoint: the file itself, or the only weights file
    of a folder that holds no JSON config (a PEFT, ResLoRA or model folder always has one)."""
    if path.is_file():
        return path if path.suffix in WEIGHT_SUFFIXES else None
    if not path.is_dir():
        return None
    children = [p for p in path.iterdir() if p.is_file()]
    if any(p.suffix == ".json" for p in children):
        return None
    weights = [p for p in children if p.suffix in WEIGHT_SUFFIXES]
    return weights[0] if len(weights) == 1 else None


def _key_names(weights: Path) -> list[str]:
    if weights.suffix == ".safetensors":
        return list(read_header(weights).entries)
    return list(load_pickle_weights(weights))


def sniff_official(path: Path) -> bool:
    weights = official_weights(path)
    if weights is None:
        return False
    try:
        names = _key_names(weights)
    except FormatError:
        return False
    if any(_FOREIGN.search(name) for name in names):
        return False
    return any(_KEY.match(name) for name in names)


def read_official(path: Path, options: ReadOptions) -> Adapter:
    """Read `<path>.lora_A` (r x in) / `<path>.lora_B` (out x r); alpha comes from the user."""
    weights = official_weights(path)
    if weights is None:
        raise FormatError(
            "is not an official DyLoRA checkpoint (a .safetensors/.bin state dict, or a folder "
            "holding just one)",
            file=path,
        )
    alpha = _user_alpha(options.alpha, path)
    tensors, _ = lazy_weights(weights)
    parts: dict[str, dict[str, LazyTensor]] = {}
    strangers = []
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None or _FOREIGN.search(key):
            strangers.append(key)
            continue
        parts.setdefault(match["path"], {})[match["part"]] = tensor
    if strangers:
        raise FormatError(
            f"holds {len(strangers)} tensors that are not DyLoRA factors, e.g. {strangers[0]!r}",
            file=weights,
            hint="loramerge reads the LoRA state dict alone (keys <module>.lora_A / .lora_B)",
        )
    if not parts:
        raise FormatError("holds no DyLoRA tensors", file=weights)
    modules = {name: _official_module(weights, name, found, alpha) for name, found in parts.items()}
    return Adapter(
        modules=modules,
        source_format=OFFICIAL,
        source_path=str(path),
        metadata={UNIT_KEY: "1"},
    )


def _user_alpha(alpha: float | None, path: Path) -> float:
    if alpha is None:
        raise OptionError(
            f"official DyLoRA checkpoints store no alpha, so {opt('alpha')} is needed",
            file=path,
            hint=f"pass the lora_alpha the model was trained with, e.g. {opt('alpha')} 16",
        )
    if isinstance(alpha, bool) or not math.isfinite(float(alpha)) or not alpha > 0:
        raise UsageError("must be a positive number", file=path, option="alpha", value=alpha)
    return float(alpha)


def _official_module(
    path: Path, name: str, found: dict[str, LazyTensor], alpha: float
) -> LoraModule:
    missing = [part for part in ("lora_A", "lora_B") if part not in found]
    if missing:
        raise FormatError(f"has no {missing[0]} tensor", file=path, module=name)
    lora_a, lora_b = found["lora_A"], found["lora_B"]
    if len(lora_a.shape) != 2 or len(lora_b.shape) != 2 or lora_a.shape[0] == 0:
        raise FormatError(
            f"lora_A {list(lora_a.shape)} and lora_B {list(lora_b.shape)} are not LoRA factors",
            file=path,
            module=name,
        )
    if lora_b.shape[1] != lora_a.shape[0]:
        raise FormatError(
            f"lora_A {list(lora_a.shape)} has {lora_a.shape[0]} rows but lora_B "
            f"{list(lora_b.shape)} has {lora_b.shape[1]} columns",
            file=path,
            module=name,
            hint="loralib MergedLinear (enable_lora) layers are not supported",
        )
    return LoraModule(path=name, lora_A=lora_a, lora_B=lora_b, alpha=alpha, kind=ModuleKind.LINEAR)


# ---------------------------------------------------------------- kohya (networks.dylora)


def sniff_kohya(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors" and kohya._looks_kohya(path, True)


def read_kohya(path: Path, options: ReadOptions) -> Adapter:
    """A kohya file whose `ss_network_module` is `networks.dylora`; alpha from `.alpha`."""
    adapter = kohya.read(path)
    metadata = dict(adapter.metadata)
    metadata[UNIT_KEY] = str(parse_unit(metadata.get("ss_network_args"), path))
    return replace(adapter, source_format=KOHYA, metadata=metadata)


def parse_unit(network_args: str | None, path: Path) -> int:
    """`unit` from kohya's `ss_network_args` JSON (values are often strings); default 1."""
    if not network_args:
        return 1
    try:
        args = json.loads(network_args)
    except json.JSONDecodeError:
        raise FormatError(
            f"ss_network_args is not valid JSON: {network_args!r}", file=path
        ) from None
    value = args.get("unit", 1) if isinstance(args, dict) else 1
    try:
        unit = int(str(value))
    except ValueError:
        unit = 0
    if unit < 1:
        raise FormatError(f"ss_network_args has an invalid unit {value!r}", file=path)
    return unit
