"""diffusers' own LoRA files (`pytorch_lora_weights.safetensors`, what `save_lora_weights` writes):
`<component>.<module path>` keys in three layouts, and each component's LoraConfig flattened into
the `lora_adapter_metadata` header field. Read and written."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramerge import __version__
from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind, match_pattern
from loramerge.errors import FormatError, opt
from loramerge.formats.common import lazy_safetensors, require_positive, require_rank
from loramerge.formats.components import keyed
from loramerge.formats.kohya import stamp
from loramerge.formats.kohya_detect import header_of
from loramerge.formats.sd_names import COMPONENT_ORDER, TEXT_ENCODERS
from loramerge.io.safetensors_writer import save_tensors

if TYPE_CHECKING:
    from loramerge.formats.registry import ReadOptions

SOURCE = "diffusers"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
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


def _parse(key: str) -> tuple[str, str, str, str] | None:
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


def sniff(path: Path) -> bool:
    weights = weights_file(path)
    header = header_of(weights) if weights is not None else None
    if header is None:
        return False
    if METADATA_KEY in header.metadata:
        return True
    return any((found := _parse(k)) and found[2] in ("A", "B") for k in header.entries)


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


def read(path: Path, options: ReadOptions | None = None) -> Adapter:
    weights = weights_file(path)
    if weights is None:
        raise FormatError(f"holds no {WEIGHT_NAME}", file=path)
    tensors, metadata = lazy_safetensors(weights)
    configs = component_configs(metadata, weights)
    grouped: dict[tuple[str, str], dict[str, LazyTensor]] = {}
    layouts: set[str] = set()
    for key, tensor in tensors.items():
        found = _parse(key)
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


# ---------------------------------------------------------------- writing


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


def _peft_magnitude(module: LoraModule) -> Any:
    """A DoRA magnitude as PEFT stores it: (out,) for Linear, (1, out, 1, ...) for convs."""
    magnitude = module.magnitude.load().reshape(-1)
    if module.kind is ModuleKind.CONV:
        ones = (1,) * (len(module.lora_A.shape) - 2)
        magnitude = magnitude.reshape(1, -1, *ones)
    return magnitude.contiguous()


def write(adapter: Adapter, folder: Path) -> None:
    """`<folder>/pytorch_lora_weights.safetensors` in PEFT's key layout (one layout per file:
    diffusers 0.42 reads the layout of the first key only) with `lora_adapter_metadata`."""
    refused = [
        m.path
        for m in adapter.modules.values()
        if m.kind not in (ModuleKind.LINEAR, ModuleKind.CONV)
    ]
    if refused or adapter.modules_to_save or adapter.base_tables:
        what = refused[0] if refused else "modules_to_save or saved embedding tables"
        raise FormatError(
            f"diffusers LoRA files hold linear and conv LoRA only, not {what}",
            file=adapter.source_path,
            hint=f"write a PEFT adapter instead ({opt('to')} peft)",
        )
    orphans = [m.path for m in adapter.modules.values() if m.component is None]
    if orphans:
        raise FormatError(
            f"diffusers LoRA files name each module's pipeline component, and this adapter's "
            f"modules have none (e.g. {orphans[0]})",
            file=adapter.source_path,
            hint=f"say which model it adapts with {opt('component')} (unet, text_encoder, ...)",
        )
    by_component: dict[str, list[LoraModule]] = {}
    for module in adapter.modules.values():
        by_component.setdefault(module.component or "", []).append(module)
    flat: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for component in sorted(by_component, key=COMPONENT_ORDER.index):
        modules = by_component[component]
        for field, value in config_for(component, modules).items():
            flat[f"{component}.{field}"] = value
        for module in modules:
            stem = f"{component}.{module.path}"
            tensors[f"{stem}.lora_A.weight"] = module.lora_A.load().contiguous()
            tensors[f"{stem}.lora_B.weight"] = module.lora_B.load().contiguous()
            if module.magnitude is not None:
                # with `.weight`: diffusers 0.42 + transformers 5 load text encoders through
                # transformers' own key mapping, which drops a bare lora_magnitude_vector
                tensors[f"{stem}.lora_magnitude_vector.weight"] = _peft_magnitude(module)
            if module.bias is not None:
                tensors[f"{stem}.lora_B.bias"] = module.bias.load().contiguous()
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True),
        "loramerge.version": __version__,
    }
    save_tensors(folder / WEIGHT_NAME, tensors, metadata)
