"""What a PEFT LoRA `adapter_config.json` means for a merge, and the config a writer produces.

Each field PEFT 0.21 defines is classified: fields that only say how the adapter was trained or
where it is attached (the merge math is W + s B A whatever their value), fields loramerge turns
into exact updates (ranks, alphas, rsLoRA, DoRA, biases, trainable tokens, initialisations that
change the base), and LoRA variants whose forward is something else, for which a merge is
refused with the field named. A field this table does not know is treated as such a variant
when it is set: a newer PEFT may have added a variant, and guessing would write a wrong model.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter, ModuleKind

# Fields that do not change what the adapter computes once loaded (VeLoRA changes only the
# backward pass; eva/loftq/corda/lora_ga configs matter only with their init_lora_weights).
PASSIVE_FIELDS = frozenset(
    {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config",
        "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out",
        "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform",
        "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config",
        "megatron_core", "modules_to_save", "peft_type", "peft_version", "r", "rank_pattern",
        "revision", "runtime_config", "target_modules", "target_parameters", "task_type",
        "trainable_token_indices", "use_dora", "use_rslora", "velora_config",
        "qalora_group_size", "use_bdlora", "kasa_config",
    }
)  # fmt: skip

# LoRA variants whose forward is not W x + s B A x: why a merged model cannot equal it.
VARIANT_REASONS = {
    "alora_invocation_tokens": "it is an activated LoRA (aLoRA): PEFT applies it only to the "
    "tokens after its invocation sequence, which a merged weight cannot do",
    "layer_replication": "it uses layer_replication: PEFT's forward runs replicated copies of "
    "base layers, each with its own LoRA, which a merge into the base's layers cannot express",
    "use_qalora": "it is a QA-LoRA adapter: its A acts on group-pooled inputs",
    "monteclora_config": "it is a MonteCLoRA adapter, whose update is sampled",
    "arrow_config": "it is an Arrow adapter, which routes between LoRAs per token",
    "megatron_config": "it was trained on Megatron parallel layers, whose weights are sharded "
    "differently from the base files",
}

# init_lora_weights values that leave the base untouched (the factors alone are the update)
PLAIN_INITS = frozenset({"true", "false", "gaussian", "eva", "orthogonal", "mica"})
# deterministic initialisations that change the base: PEFT rebuilds the residual base from the
# original weights at load time, and so can loramerge (docs/rules.md section 1); KaSA likewise
# drops the base's smallest singular components
REBUILT_INITS = frozenset({"pissa", "olora"})
KASA = "kasa"


def init_method(config: dict[str, Any]) -> str:
    value = config.get("init_lora_weights", True)
    return str(value).lower()


def merge_refusal(config: dict[str, Any]) -> str | None:
    """Why no merged model computes what this adapter computes, or None."""
    for key, value in config.items():
        if key in PASSIVE_FIELDS or value in (None, False, [], {}, ""):
            continue
        if key in VARIANT_REASONS:
            return VARIANT_REASONS[key]
        return (
            f"its config sets {key}, which loramerge does not know (a LoRA variant of a newer "
            "PEFT?); merging it as a plain LoRA could compute something else"
        )
    init = init_method(config)
    if init in PLAIN_INITS or init in REBUILT_INITS:
        return None
    if init.startswith("pissa_niter_"):
        return (
            f"it was initialised with init_lora_weights={init!r}: PEFT rebuilds its residual "
            "base with a randomised SVD at load time, which cannot be reproduced exactly"
        )
    return (
        f"it was initialised with init_lora_weights={init!r}, which changes the base weights "
        "from data or quantisation loramerge does not have"
    )


def base_init(config: dict[str, Any]) -> str | None:
    """'pissa', 'olora' or 'kasa' when the factors apply to a residual base PEFT rebuilds from
    the original base at load time."""
    if config.get("kasa_config"):
        return KASA
    init = init_method(config)
    return init if init in REBUILT_INITS else None


def _most_common(values: list[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda value: (counts[value], value))


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def target_names(adapter: Adapter) -> list[str]:
    """target_modules that make PEFT wrap exactly the adapter's modules: their full paths
    (PEFT matches a name when a module's path equals it or ends with '.' + it)."""
    return sorted({m.path for m in adapter.modules.values() if m.kind is not ModuleKind.PARAMETER})


def config_for(adapter: Adapter, layers: dict[str, str] | None = None) -> dict[str, Any]:
    """The adapter_config.json that makes PEFT rebuild exactly this adapter: the source's own
    fields kept, the ones this adapter's modules decide written anew."""
    from loramerge.errors import FormatError

    modules = [m for m in adapter.modules.values()]
    rslora = {m.use_rslora for m in modules}
    if len(rslora) > 1:
        raise FormatError(
            "mixes rsLoRA and plain scaling, which one PEFT config cannot express",
            hint="fold the scales first (a transform that sets r = alpha)",
        )
    r = _most_common([m.r for m in modules]) if modules else 8
    alpha = _most_common([m.alpha for m in modules]) if modules else 8
    # PEFT matches patterns as `(.*\.)?(PATTERN)$`: a module's full path names only itself
    pattern_key = {m.path: _pattern_path(m) for m in modules}
    config = dict(adapter.source_config)
    config.update(
        {
            "alpha_pattern": {
                pattern_key[m.path]: _number(m.alpha) for m in modules if m.alpha != alpha
            },
            "base_model_name_or_path": adapter.base_model,
            "fan_in_fan_out": any(m.kind is ModuleKind.CONV1D for m in modules),
            "inference_mode": True,
            "lora_alpha": _number(alpha),
            "lora_bias": any(m.bias is not None for m in modules),
            "modules_to_save": sorted(_saved_module(n) for n in adapter.modules_to_save) or None,
            "peft_type": "LORA",
            "r": r,
            "rank_pattern": {pattern_key[m.path]: m.r for m in modules if m.r != r},
            "target_modules": target_names(adapter),
            "task_type": adapter.task_type,
            "use_dora": any(m.magnitude is not None for m in modules),
            "use_rslora": rslora == {True},
        }
    )
    if any(m.kind is ModuleKind.PARAMETER and m.parameter is None for m in modules):
        # which parameter each wrapper holds, and how many experts (hence the rank), is known
        # only with the base's architecture: the modules are unchanged, their config is too
        for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
            if key in adapter.source_config:
                config[key] = adapter.source_config[key]
    config.setdefault("bias", "none")
    config.setdefault("lora_dropout", 0.0)
    if adapter.token_rows:
        config["trainable_token_indices"] = {
            path: list(rows.indices) for path, rows in adapter.token_rows.items()
        }
    if not adapter.saved_biases:
        config["bias"] = "none"
    if adapter.base_init is None:
        if init_method(config) in REBUILT_INITS:
            config["init_lora_weights"] = True
        config.pop("kasa_config", None)
    return config


def _pattern_path(module: Any) -> str:
    """The key PEFT matches rank/alpha patterns against: the module path, or for a wrapped
    parameter the module path (without PEFT's base_layer hops) and the parameter name."""
    if module.kind is ModuleKind.PARAMETER and module.parameter is not None:
        return module.path.replace(".base_layer", "") + "." + module.parameter
    return module.path


def _saved_module(name: str) -> str:
    """The module path of a modules_to_save tensor name (`score.weight` -> `score`)."""
    return name.rsplit(".", 1)[0]


def config_path(folder: Path) -> Path:
    return folder / "adapter_config.json"
