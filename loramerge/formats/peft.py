"""PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors` (or legacy `.bin`),
read here and written by loramerge.formats.peft_writer.

Keys are PEFT's saved names (`base_model.model.<path>.lora_A.weight`, ...). A PARAMETER module
(target_parameters) is named by PEFT's wrapper path: two parameters of one module nest two
wrappers, so the second is `<path>.base_layer`; which parameter each wraps, and how many
experts it stacks, is known only from the base's architecture (loramerge.model.fit).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind, TokenRows, match_pattern
from loramerge.errors import FormatError
from loramerge.formats.common import lazy_weights, require_positive, require_rank
from loramerge.formats.peft_config import base_init, merge_refusal
from loramerge.formats.peft_variants import BlockDiagonal, scaled_columns
from loramerge.io.json_files import read_json

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
WRAPPED = ".base_layer"
_PARTS = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "lora_diag",
)
_KEY = re.compile(
    r"^(?P<path>.+?)\.(?P<part>" + "|".join(_PARTS) + r")(?:\.(?P<adapter>(?!weight$|bias$)[^.]+))?"
    r"(?:\.(?P<param>weight|bias))?$"
)
TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"


def sniff(path: Path) -> bool:
    """A PEFT adapter folder of any tuner (the reader refuses those other than LoRA by name):
    a config naming a peft_type, or PEFT's weight file beside a config."""
    config = path / CONFIG_NAME
    if not config.is_file():
        return False
    if any((path / name).is_file() for name in WEIGHT_NAMES):
        return True
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
        file=folder,
        hint="copy the adapter's weight file into the folder",
    )


class _Settings:
    """The config values every module is read with."""

    def __init__(self, config: dict[str, Any], config_path: Path) -> None:
        self.path = config_path
        self.r = require_rank(config.get("r", 8), "r", config_path)
        self.alpha = require_positive(config.get("lora_alpha", 8), "lora_alpha", config_path)
        self.rank_pattern = _pattern(config, "rank_pattern", config_path)
        self.alpha_pattern = _pattern(config, "alpha_pattern", config_path)
        self.use_rslora = bool(config.get("use_rslora", False))
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self.wraps_parameters = bool(config.get("target_parameters"))
        self.target_modules = config.get("target_modules")

    def is_layer(self, module_path: str) -> bool:
        """Whether PEFT wrapped this module as a layer (target_modules), as opposed to a
        parameter wrapper (target_parameters): PEFT never does both to one module."""
        targets = self.target_modules
        if isinstance(targets, str):
            return targets == "all-linear" or re.fullmatch(targets, module_path) is not None
        if not isinstance(targets, list):
            return False
        return any(
            isinstance(t, str) and (module_path == t or module_path.endswith("." + t))
            for t in targets
        )

    def rank(self, key: str, module: str) -> int:
        found = match_pattern(self.rank_pattern, key)
        if found is None:
            return self.r
        return require_rank(self.rank_pattern[found], f"rank_pattern[{found!r}]", self.path, module)

    def alpha_of(self, key: str, module: str) -> float:
        found = match_pattern(self.alpha_pattern, key)
        value = self.alpha_pattern[found] if found is not None else self.alpha
        return require_positive(value, "lora_alpha", self.path, module)


def read(folder: Path) -> Adapter:
    config_path = folder / CONFIG_NAME
    config = read_json(config_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":  # other tuners: their exact LoRA form, or refused naming peft_type
        from loramerge.formats import peft_tuners

        return peft_tuners.read(folder, config, peft_type)
    settings = _Settings(config, config_path)
    blocks = BlockDiagonal(config.get("use_bdlora"), config_path)
    path = weights_file(folder)
    tensors, metadata = lazy_weights(path)
    parts: dict[str, dict[str, LazyTensor]] = {}
    other: dict[str, LazyTensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        match = _KEY.match(name)
        if match is None:
            other[name] = tensor
            continue
        part = match["part"]
        if match["param"] == "bias":
            part = "lora_B.bias" if part == "lora_B" else part + ".bias"
        parts.setdefault(match["path"], {})[part] = tensor
    modules = {p: _module(p, blocks.expand(p, found), path, settings) for p, found in parts.items()}
    source_config = {k: v for k, v in config.items() if k != "use_bdlora"}  # expanded here
    adapter = Adapter(
        modules=modules,
        base_model=_text(config.get("base_model_name_or_path")),
        source_format="peft",
        source_path=str(folder),
        task_type=_text(config.get("task_type")),
        metadata=metadata,
        base_init=base_init(config),
        merge_refusal=merge_refusal(config),
        source_config=source_config,
    )
    _sort_other_tensors(adapter, other, config, config_path)
    if not modules and not adapter.modules_to_save and not adapter.token_rows:
        raise FormatError("holds no LoRA tensors", file=path, hint="is this the right file?")
    return adapter


def _sort_other_tensors(
    adapter: Adapter, other: dict[str, LazyTensor], config: dict[str, Any], config_path: Path
) -> None:
    """Full tensors beside the factors: trained token rows, saved embedding tables, trained
    biases (bias="all"/"lora_only") and modules_to_save copies."""
    saved = config.get("modules_to_save") or []
    trains_biases = str(config.get("bias", "none")) != "none"
    for name, tensor in other.items():
        if name.endswith(TOKEN_DELTA):
            module = name.removesuffix(TOKEN_DELTA)
            indices = _token_indices(config.get("trainable_token_indices"), module, config_path)
            if len(tensor.shape) != 2 or tensor.shape[0] != len(indices):
                raise FormatError(
                    f"trainable token rows {list(tensor.shape)} do not match the "
                    f"{len(indices)} indices in trainable_token_indices",
                    file=config_path,
                    module=module,
                )
            adapter.token_rows[module] = TokenRows(tuple(indices), tensor)
            continue
        name = name.replace(".modules_to_save.default.", ".")
        module = name.rsplit(".", 1)[0]
        if name.endswith(WRAPPED + ".weight"):
            adapter.base_tables[name.replace(WRAPPED + ".weight", ".weight")] = tensor
        elif any(module.endswith(entry) for entry in saved if isinstance(entry, str)):
            adapter.modules_to_save[name] = tensor
        elif trains_biases and name.endswith(".bias"):
            adapter.saved_biases[name.replace(WRAPPED + ".bias", ".bias")] = tensor
        else:
            adapter.modules_to_save[name] = tensor


def _token_indices(value: Any, module: str, config_path: Path) -> list[int]:
    """The token indices PEFT trained for `module` (a list: the input embedding; a dict: per
    module name, matched as PEFT matches it)."""
    if isinstance(value, dict):
        found = [v for k, v in value.items() if module == k or module.endswith("." + k)]
        value = found[0] if len(found) == 1 else None
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    ):
        raise FormatError(
            f"trainable_token_indices gives no list of token ids for {module}",
            file=config_path,
            module=module,
        )
    return value


def _module(
    module_path: str, found: dict[str, LazyTensor], path: Path, settings: _Settings
) -> LoraModule:
    embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    missing = [k for k in (a_key, b_key) if k not in found]
    if missing:
        raise FormatError(f"has no {missing[0]} tensor", file=path, module=module_path)
    lora_a, lora_b = found[a_key], found[b_key]
    if "lora_diag" in found:
        lora_b = scaled_columns(lora_b, found["lora_diag"], path, module_path)
    rows = lora_a.shape[0] if lora_a.shape else 0
    dims = (2,) if embedding else (2, 3, 4, 5)
    if len(lora_a.shape) not in dims or len(lora_b.shape) != len(lora_a.shape) or rows == 0:
        raise FormatError(
            f"A {list(lora_a.shape)} and B {list(lora_b.shape)} are not LoRA factors",
            file=path,
            module=module_path,
        )
    if lora_b.shape[1] != rows:
        raise FormatError(
            f"rank of A {list(lora_a.shape)} and B {list(lora_b.shape)} disagree",
            file=path,
            module=module_path,
        )
    bias = found.get("lora_B.bias")
    if bias is not None and tuple(bias.shape) != (lora_b.shape[0],):
        raise FormatError(
            f"lora_B.bias {list(bias.shape)} does not match lora_B's {lora_b.shape[0]} outputs",
            file=path,
            module=module_path,
        )
    wrapped = settings.wraps_parameters and (
        WRAPPED in module_path or not settings.is_layer(module_path)
    )
    if embedding:
        kind = ModuleKind.EMBEDDING
    elif len(lora_a.shape) > 2:
        kind = ModuleKind.CONV
    else:
        kind = ModuleKind.PARAMETER if wrapped else ModuleKind.LINEAR
    module = LoraModule(
        path=module_path,
        lora_A=lora_a,
        lora_B=lora_b,
        alpha=settings.alpha_of(module_path, module_path),
        kind=kind,
        use_rslora=settings.use_rslora,
        magnitude=found.get("lora_magnitude_vector"),
        bias=found.get("lora_B.bias"),
        fan_in_fan_out=settings.fan_in_fan_out,
    )
    if not settings.wraps_parameters:
        # with target_parameters, a module may stack experts: its rank is checked once the
        # architecture says how many (loramerge.model.fit)
        check_rank(module, settings.rank(module_path, module_path), settings.path)
    return module


def check_rank(module: LoraModule, expected: int, config_path: Path) -> None:
    if expected != module.r:
        raise FormatError(
            f"the config gives rank {expected} but the tensors have rank {module.r}",
            file=config_path,
            module=module.path,
            hint="fix r or rank_pattern in adapter_config.json",
        )


def _pattern(config: dict[str, Any], key: str, config_path: Path) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: a JSON object (null, absent or empty: no patterns)."""
    value = config.get(key)
    if not value:
        return {}
    if not isinstance(value, dict):
        raise FormatError(
            f"{key} must map module patterns to numbers, got {type(value).__name__}",
            file=config_path,
        )
    return value


def _text(value: Any) -> str | None:
    """An informational string field; other JSON values are dropped rather than carried on."""
    return value if isinstance(value, str) else None
