"""Engine profiles: one entry per inference engine, each an exact rewrite of an adapter for what
that engine reads, or a refusal. The command line's choices and the docs' table come from
ENGINES; the rewrites themselves (loramerge.engines.servers) load on first use, so that this
table loads without torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loramerge.errors import OptionError, UsageError, opt

if TYPE_CHECKING:
    import torch

    from loramerge.adapter import Adapter

# vLLM's LoRAConfig.max_lora_rank is a Literal over exactly these values.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class BaseFacts:
    """What a profile may know of the base model: its config.json, and when the base's files
    are at hand, `tensor(name)` reads one of its tensors (None when the base has no such
    tensor)."""

    config: Mapping[str, Any] | None = None
    tensor: Callable[[str], torch.Tensor | None] | None = None


@dataclass(frozen=True)
class Profiled:
    """An adapter rewritten for one engine, what changed, and how to start the engine."""

    engine: str
    adapter: Adapter
    notes: tuple[str, ...] = ()
    launch: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "notes": list(self.notes),
            "launch": dict(self.launch),
            "launch_args": launch_args(self.launch),
        }


def launch_args(launch: Mapping[str, Any]) -> list[str]:
    """The engine's own command-line arguments for these launch settings."""
    return [f"--{key.replace('_', '-')} {value}" for key, value in launch.items()]


@dataclass(frozen=True)
class EngineProfile:
    """One engine: what it reads, the output formats it loads (the first is the default), its
    docs page under docs/engines/, and the name of its rewrite in loramerge.engines.servers."""

    name: str
    reads: str
    formats: tuple[str, ...]
    rewrite_name: str

    @property
    def docs(self) -> str:
        return f"docs/engines/{self.name}.md"

    def rewrite(self, adapter: Adapter, base: BaseFacts) -> Profiled:
        servers = importlib.import_module("loramerge.engines.servers")
        return getattr(servers, self.rewrite_name)(adapter, base)


ENGINES: list[EngineProfile] = [
    EngineProfile("peft", "everything PEFT writes", ("peft",), "peft"),
    EngineProfile(
        "vllm",
        "r, lora_alpha, use_rslora and target_modules; no DoRA, lora_bias or modules_to_save "
        "other than classifier/score; ranks up to 512",
        ("peft",),
        "vllm",
    ),
    EngineProfile(
        "tgi",
        "prefixed q/k/v/o/gate/up/down LoRA at one rank and one lora_alpha / r",
        ("peft",),
        "tgi",
    ),
    EngineProfile(
        "lorax",
        "prefixed q/k/v/o/gate/up/down LoRA at one rank and one lora_alpha / r",
        ("peft",),
        "lorax",
    ),
    EngineProfile(
        "sglang",
        "one rank and lora_alpha / r everywhere; no rsLoRA or patterns",
        ("peft",),
        "sglang",
    ),
    EngineProfile(
        "llama.cpp",
        "a LoRA GGUF for LLaMA-family bases (llama, mistral, qwen2)",
        ("gguf",),
        "llama_cpp",
    ),
]

ENGINE_NAMES = tuple(entry.name for entry in ENGINES)


def engine_profile(name: str) -> EngineProfile:
    for entry in ENGINES:
        if entry.name == name.lower():
            return entry
    raise UsageError(
        f"is not an engine loramerge knows; choose one of {', '.join(ENGINE_NAMES)}",
        option="engine",
        value=name,
    )


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest max-lora-rank vLLM accepts that fits `rank`; None above its largest."""
    return next((choice for choice in VLLM_MAX_LORA_RANKS if choice >= rank), None)


def output_for(engine: str | None, to: str | None) -> str | None:
    """The output format to write: `to`, else the engine's own format; refuses a format the
    engine does not load."""
    if engine is None:
        return to
    profile = engine_profile(engine)
    if to is None:
        return profile.formats[0]
    if to not in profile.formats:
        raise UsageError(
            f"loads {' or '.join(profile.formats)}, not {to}",
            option="engine",
            value=profile.name,
            hint=f"pass {opt('to')} {profile.formats[0]}, or leave {opt('to')} out",
        )
    return to


def apply_engine(
    adapter: Adapter, engine: str, to: str, base: BaseFacts | Mapping[str, Any] | None = None
) -> Profiled:
    """Rewrite `adapter` for `engine`, which must load the output format `to`. `base` is what
    is known of the base model (a bare config.json mapping is accepted too)."""
    output_for(engine, to)
    if adapter.dense_updates:
        key, update = next(iter(adapter.dense_updates.items()))
        raise OptionError(
            f"{engine} cannot serve {update.method}: it has no LoRA form ({update.why})",
            file=adapter.source_path,
            module=key,
            option="engine",
            hint="merge it into the base instead (loramerge merge)",
        )
    if not isinstance(base, BaseFacts):
        base = BaseFacts(config=base)
    return engine_profile(engine).rewrite(adapter, base)


def combine_reports(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Merge one output's profile summary into `into` (several outputs, one engine): notes
    once each, launch values at their largest so that one server start fits every output."""
    into.setdefault("engine", part.get("engine"))
    notes = into.setdefault("notes", [])
    notes += [n for n in part.get("notes", []) if n not in notes]
    launch = into.setdefault("launch", {})
    for key, value in part.get("launch", {}).items():
        launch[key] = max(launch.get(key, value), value)
    into["launch_args"] = launch_args(launch)
