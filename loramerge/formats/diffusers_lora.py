"""diffusers' own LoRA files (`pytorch_lora_weights.safetensors`, what `save_lora_weights` writes),
read: `<component>.<module path>` keys in three layouts (diffusers_keys), each component's
LoraConfig flattened into the `lora_adapter_metadata` header field (diffusers_metadata). Written
by diffusers_writer."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind, match_pattern
from loramerge.errors import FormatError
from loramerge.formats.common import lazy_safetensors, require_positive, require_rank
from loramerge.formats.components import keyed
from loramerge.formats.diffusers_keys import WEIGHT_NAME, parse_key, weights_file
from loramerge.formats.diffusers_metadata import METADATA_KEY, component_configs
from loramerge.formats.kohya import stamp
from loramerge.formats.kohya_detect import header_of
from loramerge.formats.sd_names import COMPONENT_ORDER

if TYPE_CHECKING:
    from loramerge.formats.registry import ReadOptions

SOURCE = "diffusers"


def sniff(path: Path) -> bool:
    weights = weights_file(path)
    header = header_of(weights) if weights is not None else None
    if header is None:
        return False
    if METADATA_KEY in header.metadata:
        return True
    return any((found := parse_key(k)) and found[2] in ("A", "B") for k in header.entries)


def read(path: Path, options: ReadOptions | None = None) -> Adapter:
    weights = weights_file(path)
    if weights is None:
        raise FormatError(f"holds no {WEIGHT_NAME}", file=path)
    tensors, metadata = lazy_safetensors(weights)
    configs = component_configs(metadata, weights)
    grouped: dict[tuple[str, str], dict[str, LazyTensor]] = {}
    layouts: set[str] = set()
    for key, tensor in tensors.items():
        found = parse_key(key)
        if found is None:
            raise FormatError(
                f"tensor {key!r} is not a diffusers LoRA key (<component>.<path>.lora_A.weight, "
                "...)",
                file=weights,
            )
        component, module_path, part, layout = found
        parts = grouped.setdefault((component, module_path), {})
        if part in parts:
            raise FormatError(f"holds two {part} tensors (in two layouts)", file=weights,
                              module=f"{component}.{module_path}")  # fmt: skip
        parts[part] = tensor
        if part in ("A", "B"):
            layouts.add(layout)
    modules = [
        _module(weights, component, module_path, parts, configs.get(component))
        for (component, module_path), parts in grouped.items()
    ]
    if not modules:
        raise FormatError("holds no LoRA tensors", file=weights)
    return Adapter(
        modules=keyed(modules),
        source_format=SOURCE,
        source_path=str(path),
        metadata={**metadata, **_read_info(modules, configs, layouts)},
    )


def _module(
    path: Path,
    component: str,
    module_path: str,
    parts: dict[str, LazyTensor],
    config: dict[str, Any] | None,
) -> LoraModule:
    where = f"{component}.{module_path}"
    if "A" not in parts or "B" not in parts:
        missing = "lora_A (down)" if "A" not in parts else "lora_B (up)"
        raise FormatError(f"has no {missing} tensor", file=path, module=where)
    lora_a, lora_b = parts["A"], parts["B"]
    r = lora_a.shape[0] if lora_a.shape else 0
    if (
        len(lora_a.shape) not in (2, 4)
        or len(lora_b.shape) != len(lora_a.shape)
        or r == 0
        or lora_b.shape[1] != r
        or math.prod(lora_b.shape[2:]) != 1
    ):
        raise FormatError(
            f"lora_A {list(lora_a.shape)} and lora_B {list(lora_b.shape)} are not LoRA factors",
            file=path,
            module=where,
        )
    alpha, use_rslora = _scale(path, where, module_path, r, parts, config)
    magnitude = parts.get("magnitude")
    if magnitude is not None:
        out_features = lora_b.shape[0]
        if math.prod(magnitude.shape) != out_features or max(magnitude.shape) != out_features:
            raise FormatError(
                f"DoRA magnitude {list(magnitude.shape)} is not one value per output",
                file=path,
                module=where,
            )
        magnitude = _flat(magnitude, out_features)
    bias = parts.get("bias")
    if bias is not None and bias.shape != (lora_b.shape[0],):
        raise FormatError(f"lora_B bias {list(bias.shape)} is not (out,)", file=path, module=where)
    return LoraModule(
        path=module_path,
        lora_A=lora_a,
        lora_B=lora_b,
        alpha=alpha,
        kind=ModuleKind.CONV if len(lora_a.shape) == 4 else ModuleKind.LINEAR,
        use_rslora=use_rslora,
        magnitude=magnitude,
        bias=bias,
        component=component,
    )


def _flat(tensor: LazyTensor, size: int) -> LazyTensor:
    """PEFT stores a conv's DoRA magnitude as (1, out, 1, 1): the model keeps it as (out,)."""
    if tensor.shape == (size,):
        return tensor
    return LazyTensor((size,), tensor.dtype, lambda: tensor.read().reshape(size))


def _scale(
    path: Path,
    where: str,
    module_path: str,
    r: int,
    parts: dict[str, LazyTensor],
    config: dict[str, Any] | None,
) -> tuple[float, bool]:
    """(alpha, use_rslora): from the component's LoraConfig, else the module's .alpha tensor,
    else alpha = r (scale 1), as diffusers loads it."""
    component = where.split(".", 1)[0]
    if config is not None:
        wanted = _pattern_value(config, "rank_pattern", "r", module_path, path)
        if require_rank(wanted, f"{component} r", path, where) != r:
            raise FormatError(
                f"has rank {r}, but lora_adapter_metadata gives it rank {wanted}",
                file=path,
                module=where,
            )
        if "alpha" in parts:
            raise FormatError(
                "has an .alpha tensor and lora_adapter_metadata: diffusers refuses both",
                file=path,
                module=where,
            )
        raw = _pattern_value(config, "alpha_pattern", "lora_alpha", module_path, path)
        alpha = require_positive(raw, f"{component} lora_alpha", path, where)
        return alpha, config.get("use_rslora") is True
    if "alpha" in parts:
        value = parts["alpha"].load().reshape(-1)
        if value.numel() != 1:
            raise FormatError("alpha must hold one number", file=path, module=where)
        return require_positive(float(value[0]), "alpha", path, where), False
    return float(r), False


def _pattern_value(
    config: dict[str, Any], patterns_key: str, default_key: str, module_path: str, path: Path
) -> Any:
    patterns = config.get(patterns_key) or {}
    if not isinstance(patterns, dict):
        raise FormatError(f"{patterns_key} in lora_adapter_metadata is not an object", file=path)
    found = match_pattern(patterns, module_path)
    if found is not None:
        return patterns[found]
    if default_key not in config:
        raise FormatError(f"lora_adapter_metadata has no {default_key}", file=path)
    return config[default_key]


def _read_info(
    modules: list[LoraModule], configs: dict[str, dict[str, Any]], layouts: set[str]
) -> dict[str, str]:
    counts = Counter(m.component for m in modules)
    ordered = sorted(counts, key=lambda c: COMPONENT_ORDER.index(c))
    if configs:
        rule = (
            "lora_alpha / r (lora_alpha / sqrt(r) with use_rslora) from lora_adapter_metadata "
            "per component; rank_pattern / alpha_pattern by PEFT's rule"
        )
    elif any(m.alpha != m.r for m in modules):
        rule = "alpha / r with each module's .alpha tensor (no lora_adapter_metadata)"
    else:
        rule = "1 (no lora_adapter_metadata and no .alpha tensors: alpha = r, as diffusers loads)"
    return stamp(
        "diffusers (save_lora_weights)",
        "LoRA (DoRA when magnitudes are saved), keys " + ", ".join(sorted(layouts)),
        rule,
        [
            "components " + ", ".join(f"{c} ({counts[c]})" for c in ordered),
            "module paths as the file names them",
        ],
    )
