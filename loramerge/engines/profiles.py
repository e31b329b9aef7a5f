"""Engine profiles: an adapter rewritten exactly for what one inference engine reads, or refused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from loramerge.adapter import Adapter, ModuleKind, common_alpha
from loramerge.engines.rewrites import (
    BaseConfig,
    _refuse,
    add_zero_modules,
    check_vocabulary,
    every_layer,
    one_scale,
    plain_scales,
    refuse_dora_and_bias,
    refuse_kinds,
    refuse_modules_to_save,
    refuse_names,
    stacked_groups,
)
from loramerge.errors import OptionError

# vLLM's LoRAConfig.max_lora_rank is a Literal over exactly these values.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_SAVED_HEADS = ("classifier", "score")
TGI_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Profiled:
    """An adapter rewritten for one engine, what changed, and how to start the engine."""

    engine: str
    adapter: Adapter
    notes: tuple[str, ...] = ()
    launch: dict[str, Any] = field(default_factory=dict)

    @property
    def launch_args(self) -> list[str]:
        return [f"--{key.replace('_', '-')} {value}" for key, value in self.launch.items()]

    def summary(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "notes": list(self.notes),
            "launch": dict(self.launch),
            "launch_args": self.launch_args,
        }


@dataclass(frozen=True)
class EngineProfile:
    """One engine: what it reads, the output formats it loads, and the rewrite."""

    name: str
    reads: str
    formats: tuple[str, ...]
    rewrite: Callable[[Adapter, BaseConfig], Profiled]


# --- the profiles --------------------------------------------------------------------------
# Keys: the PEFT writer always writes `base_model.model.<path>.lora_A.weight` (no adapter name),
# which is what TGI and LoRAX require and what vLLM and SGLang accept; no profile changes that.


def _peft(adapter: Adapter, base_config: BaseConfig) -> Profiled:
    notes = []
    if len({m.use_rslora for m in adapter.modules.values()}) > 1:
        adapter = plain_scales(adapter)
        notes.append("mixed rsLoRA and plain modules re-expressed as lora_alpha / r (exact)")
    return Profiled("peft", adapter, tuple(notes))


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that fits `rank`; None above its largest."""
    return next((choice for choice in VLLM_MAX_LORA_RANKS if choice >= rank), None)


def _vllm(adapter: Adapter, base_config: BaseConfig) -> Profiled:
    refuse_dora_and_bias(adapter, "vLLM")
    refuse_modules_to_save(adapter, "vLLM", VLLM_SAVED_HEADS)
    refuse_kinds(adapter, "vLLM", (ModuleKind.CONV,))
    notes = check_vocabulary(adapter, "vLLM", base_config)
    top = max((m.r for m in adapter.modules.values()), default=1)
    choice = vllm_max_lora_rank(top)
    if choice is None:
        largest = max(adapter.modules.values(), key=lambda m: m.r)
        raise OptionError(
            f"vLLM cannot serve rank {top}: its largest --max-lora-rank is "
            f"{VLLM_MAX_LORA_RANKS[-1]}",
            path=adapter.source_path,
            module=largest.path,
            hint="reduce the rank first (loramerge truncate)",
        )
    # vLLM computes one scale from the config's r and lora_alpha: make it right everywhere.
    adapter, changed = one_scale(adapter, uniform_rank=False)
    if adapter.base_tables:
        notes.append("vLLM skips the saved base_layer embedding tables; they match the base")
    notes += changed
    return Profiled("vllm", adapter, tuple(notes), {"max_lora_rank": choice})


def _tgi_like(engine: str, label: str) -> Callable[[Adapter, BaseConfig], Profiled]:
    def rewrite(adapter: Adapter, base_config: BaseConfig) -> Profiled:
        refuse_dora_and_bias(adapter, label)
        refuse_modules_to_save(adapter, label)
        refuse_names(adapter, label, TGI_MODULES)
        adapter, notes = one_scale(adapter, uniform_rank=True)
        adapter, added = add_zero_modules(
            adapter, every_layer(adapter, base_config), label, base_config
        )
        notes += added
        return Profiled(engine, adapter, tuple(notes))

    return rewrite


def _sglang(adapter: Adapter, base_config: BaseConfig) -> Profiled:
    refuse_dora_and_bias(adapter, "SGLang")
    refuse_modules_to_save(adapter, "SGLang")
    refuse_kinds(adapter, "SGLang", (ModuleKind.CONV,))
    notes = check_vocabulary(adapter, "SGLang", base_config)
    adapter, changed = one_scale(adapter, uniform_rank=True)
    adapter, added = add_zero_modules(adapter, stacked_groups(adapter), "SGLang", base_config)
    return Profiled("sglang", adapter, tuple(notes + changed + added))


def _llama_cpp(adapter: Adapter, base_config: BaseConfig) -> Profiled:
    refuse_dora_and_bias(adapter, "llama.cpp")
    refuse_modules_to_save(adapter, "llama.cpp")
    refuse_kinds(adapter, "llama.cpp", (ModuleKind.CONV, ModuleKind.CONV1D))
    notes = check_vocabulary(adapter, "llama.cpp", base_config)
    if (base_config or {}).get("tie_word_embeddings"):
        tied = [m.path for m in adapter.modules.values() if m.name == "lm_head"]
        _refuse(
            adapter,
            "llama.cpp",
            "lm_head LoRA on a base with tied embeddings",
            tied,
            "merge it into the base instead (loramerge merge)",
        )
    if adapter.base_tables:
        notes.append("saved base_layer embedding tables not written: llama.cpp uses the base's")
        adapter = replace(adapter, base_tables={})
    adapter = plain_scales(adapter)
    if common_alpha(list(adapter.modules.values())) is None:
        notes.append("scales differ between modules: folded into lora_b, no adapter.lora.alpha")
    return Profiled("llama.cpp", adapter, tuple(notes))


ENGINES: list[EngineProfile] = [
    EngineProfile("peft", "everything PEFT writes", ("peft",), _peft),
    EngineProfile(
        "vllm",
        "r, lora_alpha, use_rslora and target_modules; no DoRA, lora_bias or modules_to_save "
        "other than classifier/score; ranks up to 512",
        ("peft",),
        _vllm,
    ),
    EngineProfile(
        "tgi",
        "prefixed q/k/v/o/gate/up/down LoRA at one rank and one lora_alpha / r",
        ("peft",),
        _tgi_like("tgi", "TGI"),
    ),
    EngineProfile(
        "lorax",
        "prefixed q/k/v/o/gate/up/down LoRA at one rank and one lora_alpha / r",
        ("peft",),
        _tgi_like("lorax", "LoRAX"),
    ),
    EngineProfile(
        "sglang",
        "one rank and lora_alpha / r everywhere; no rsLoRA or patterns",
        ("peft",),
        _sglang,
    ),
    EngineProfile(
        "llama.cpp",
        "a LoRA GGUF for LLaMA-family bases (llama, mistral, qwen2)",
        ("gguf",),
        _llama_cpp,
    ),
]


def engine_profile(name: str) -> EngineProfile:
    for entry in ENGINES:
        if entry.name == name.lower():
            return entry
    names = ", ".join(e.name for e in ENGINES)
    raise OptionError(f"unknown engine {name!r}; choose one of {names}")


def apply_engine(
    adapter: Adapter, engine: str, to: str, base_config: BaseConfig = None
) -> Profiled:
    """Rewrite `adapter` for `engine`, which must load the output format `to`."""
    profile = engine_profile(engine)
    if to not in profile.formats:
        raise OptionError(
            f"--engine {profile.name} loads {' or '.join(profile.formats)}, not {to}",
            hint=f"pass --to {profile.formats[0]}",
        )
    return profile.rewrite(adapter, base_config)


def combine_reports(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Merge one output's profile summary into `into` (several outputs, one engine): notes
    once each, launch values at their largest so that one server start fits every output."""
    into.setdefault("engine", part.get("engine"))
    notes = into.setdefault("notes", [])
    notes += [n for n in part.get("notes", []) if n not in notes]
    launch = into.setdefault("launch", {})
    for key, value in part.get("launch", {}).items():
        launch[key] = max(launch.get(key, value), value)
    into["launch_args"] = [f"--{k.replace('_', '-')} {v}" for k, v in launch.items()]
