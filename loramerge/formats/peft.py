"""PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors` (or legacy `.bin`)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from loramerge import __version__
from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind, match_pattern
from loramerge.errors import FormatError
from loramerge.formats.common import lazy_weights, require_positive, require_rank
from loramerge.io.json_files import read_json
from loramerge.io.safetensors_writer import save_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_KEY = re.compile(
    r"^(?P<path>.+?)\.(?P<part>" + "|".join(_PARTS) + r")(?:\.(?P<adapter>(?!weight$|bias$)[^.]+))?"
    r"(?:\.(?P<param>weight|bias))?$"
)


def sniff(path: Path) -> bool:
    config = path / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # claim it, so that the reader reports the broken config
    # any peft_type (tuners other than LoRA go to peft_tuners); no peft_type: not mlx-lm's
    return isinstance(data, dict) and ("peft_type" in data or "lora_parameters" not in data)


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise FormatError(
        "has adapter_config.json but no adapter_model.safetensors or adapter_model.bin",
        path=folder,
        hint="copy the adapter's weight file into the folder",
    )


def read(folder: Path) -> Adapter:
    config_path = folder / CONFIG_NAME
    config = read_json(config_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":  # other tuners: their exact LoRA form, or refused naming peft_type
        from loramerge.formats import peft_tuners

        return peft_tuners.read(folder, config, peft_type)
    config_r = require_rank(config.get("r", 8), "r", config_path)
    config_alpha = require_positive(config.get("lora_alpha", 8), "lora_alpha", config_path)
    rank_pattern = _pattern(config, "rank_pattern", config_path)
    alpha_pattern = _pattern(config, "alpha_pattern", config_path)
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    if config.get("trainable_token_indices"):
        raise FormatError(
            "uses trainable_token_indices, which loramerge cannot merge yet", path=config_path
        )

    path = weights_file(folder)
    tensors, metadata = lazy_weights(path)
    parts: dict[str, dict[str, LazyTensor]] = {}
    modules_to_save: dict[str, LazyTensor] = {}
    base_tables: dict[str, LazyTensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        match = _KEY.match(name)
        if match is None:
            if name.endswith(".base_layer.weight"):
                base_tables[name.replace(".base_layer.weight", ".weight")] = tensor
            else:
                modules_to_save[name.replace(".modules_to_save.default.", ".")] = tensor
            continue
        part = match["part"]
        if match["param"] == "bias":
            part = "lora_B.bias" if part == "lora_B" else part + ".bias"
        parts.setdefault(match["path"], {})[part] = tensor

    modules = {}
    for module_path, found in parts.items():
        modules[module_path] = _module(
            module_path,
            found,
            path,
            config_r,
            config_alpha,
            rank_pattern,
            alpha_pattern,
            use_rslora,
            fan_in_fan_out,
        )
    if not modules and not modules_to_save:
        raise FormatError("holds no LoRA tensors", path=path, hint="is this the right file?")
    return Adapter(
        modules=modules,
        modules_to_save=modules_to_save,
        base_tables=base_tables,
        base_model=_text(config.get("base_model_name_or_path")),
        source_format="peft",
        source_path=str(folder),
        task_type=_text(config.get("task_type")),
        metadata=metadata,
    )


def _module(
    module_path: str,
    found: dict[str, LazyTensor],
    path: Path,
    config_r: int,
    config_alpha: float,
    rank_pattern: dict[str, Any],
    alpha_pattern: dict[str, Any],
    use_rslora: bool,
    fan_in_fan_out: bool,
) -> LoraModule:
    embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    missing = [k for k in (a_key, b_key) if k not in found]
    if missing:
        raise FormatError(f"has no {missing[0]} tensor", path=path, module=module_path)
    lora_a, lora_b = found[a_key], found[b_key]
    r = lora_a.shape[0] if lora_a.shape else 0
    dims = (2,) if embedding else (2, 4)
    if len(lora_a.shape) not in dims or len(lora_b.shape) != len(lora_a.shape) or r == 0:
        raise FormatError(
            f"A {list(lora_a.shape)} and B {list(lora_b.shape)} are not LoRA factors",
            path=path,
            module=module_path,
        )
    if lora_b.shape[1] != r:
        raise FormatError(
            f"rank of A {list(lora_a.shape)} and B {list(lora_b.shape)} disagree",
            path=path,
            module=module_path,
        )
    rank_key = match_pattern(rank_pattern, module_path)
    expected_r = config_r
    if rank_key is not None:
        expected_r = require_rank(
            rank_pattern[rank_key], f"rank_pattern[{rank_key!r}]", path.parent / CONFIG_NAME
        )
    if expected_r != r:
        raise FormatError(
            f"the config gives rank {expected_r} but the tensors have rank {r}",
            path=path.parent / CONFIG_NAME,
            module=module_path,
            hint="fix r or rank_pattern in adapter_config.json",
        )
    alpha_key = match_pattern(alpha_pattern, module_path)
    alpha = alpha_pattern[alpha_key] if alpha_key is not None else config_alpha
    alpha = require_positive(alpha, "lora_alpha", path.parent / CONFIG_NAME, module_path)
    if embedding:
        kind = ModuleKind.EMBEDDING
    elif len(lora_a.shape) == 4:
        kind = ModuleKind.CONV
    else:
        kind = ModuleKind.LINEAR
    return LoraModule(
        path=module_path,
        lora_A=lora_a,
        lora_B=lora_b,
        alpha=alpha,
        kind=kind,
        use_rslora=use_rslora,
        magnitude=found.get("lora_magnitude_vector"),
        bias=found.get("lora_B.bias"),
        fan_in_fan_out=fan_in_fan_out,
    )


def _pattern(config: dict[str, Any], key: str, config_path: Path) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: a JSON object (null, absent or empty: no patterns)."""
    value = config.get(key)
    if not value:
        return {}
    if not isinstance(value, dict):
        raise FormatError(
            f"{key} must map module patterns to numbers, got {type(value).__name__}",
            path=config_path,
        )
    return value


def _text(value: Any) -> str | None:
    """An informational string field; other JSON values are dropped rather than carried on."""
    return value if isinstance(value, str) else None


def _most_common(values: list[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda value: (counts[value], value))


def config_for(adapter: Adapter) -> dict[str, Any]:
    """The adapter_config.json that makes PEFT rebuild exactly these scales."""
    modules = list(adapter.modules.values())
    rslora = {m.use_rslora for m in modules}
    if len(rslora) > 1:
        raise FormatError(
            "mixes rsLoRA and plain scaling, which one PEFT config cannot express",
            hint="fold the scales first (a transform that sets r = alpha)",
        )
    r = _most_common([m.r for m in modules]) if modules else 8
    alpha = _most_common([m.alpha for m in modules]) if modules else 8
    rank_pattern = {m.path: m.r for m in modules if m.r != r}
    alpha_pattern = {m.path: _number(m.alpha) for m in modules if m.alpha != alpha}
    save_names = sorted(
        {name.rsplit(".", 1)[0].rsplit(".", 1)[-1] for name in adapter.modules_to_save}
    )
    return {
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": adapter.base_model,
        "bias": "none",
        "fan_in_fan_out": any(m.kind is ModuleKind.CONV1D or m.fan_in_fan_out for m in modules),
        "inference_mode": True,
        "lora_alpha": _number(alpha),
        "lora_bias": any(m.bias is not None for m in modules),
        "lora_dropout": 0.0,
        "modules_to_save": save_names or None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "target_modules": sorted({m.name for m in modules}),
        "task_type": adapter.task_type,
        "use_dora": any(m.magnitude is not None for m in modules),
        "use_rslora": rslora == {True},
    }


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def state_dict_for(adapter: Adapter) -> dict[str, Any]:
    """PEFT's saved keys: `base_model.model.` prefix, no adapter name."""
    tensors = {}
    for module in adapter.modules.values():
        stem = PREFIX + module.path
        if module.kind is ModuleKind.EMBEDDING:
            tensors[f"{stem}.lora_embedding_A"] = module.lora_A.load()
            tensors[f"{stem}.lora_embedding_B"] = module.lora_B.load()
        else:
            tensors[f"{stem}.lora_A.weight"] = module.lora_A.load()
            tensors[f"{stem}.lora_B.weight"] = module.lora_B.load()
        if module.magnitude is not None:
            tensors[f"{stem}.lora_magnitude_vector"] = module.magnitude.load()
        if module.bias is not None:
            tensors[f"{stem}.lora_B.bias"] = module.bias.load()
    for name, tensor in adapter.modules_to_save.items():
        tensors[PREFIX + name] = tensor.load()
    for name, tensor in adapter.base_tables.items():
        tensors[PREFIX + name.removesuffix(".weight") + ".base_layer.weight"] = tensor.load()
    return {k: v.contiguous() for k, v in tensors.items()}


def write(adapter: Adapter, folder: Path) -> None:
    """Write a PEFT adapter folder into an existing (empty, temporary) folder."""
    config = config_for(adapter)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    metadata = {"format": "pt", "loramerge.version": __version__}
    save_tensors(folder / WEIGHT_NAMES[0], state_dict_for(adapter), metadata)
