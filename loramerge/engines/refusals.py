"""Refusals that the engine profiles are built from: each refuses, with an OptionError naming
the modules, what an engine would serve differently from PEFT, or warns where it cannot tell."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loramerge.adapter import Adapter, ModuleKind

if TYPE_CHECKING:
    from loramerge.engines.profiles import BaseFacts
from loramerge.engines.rewrites import BaseConfig
from loramerge.errors import OptionError, opt


def refuse(adapter: Adapter, engine: str, what: str, names: list[str], hint: str) -> None:
    if names:
        count = f"{len(names)} entries have it" if len(names) > 1 else "the only entry with it"
        raise OptionError(
            f"{engine} cannot serve {what} ({count})",
            file=adapter.source_path,
            module=names[0],
            hint=hint,
        )


MERGE_HINT = f"merge it into the base instead (loramerge merge), or write {opt('engine')} peft"


def refuse_dora_and_bias(adapter: Adapter, engine: str) -> None:
    modules = adapter.modules.values()
    refuse(
        adapter, engine, "DoRA", [m.path for m in modules if m.magnitude is not None], MERGE_HINT
    )
    refuse(
        adapter, engine, "lora_bias", [m.path for m in modules if m.bias is not None], MERGE_HINT
    )


def refuse_peft_only(adapter: Adapter, engine: str) -> None:
    """What only PEFT itself loads: LoRA on bare parameters (MoE experts, routers), trained
    token rows and biases, adapters no merged weight computes (aLoRA, replicated layers, ...),
    and factors that apply to a residual base PEFT rebuilds at load time."""
    modules = adapter.modules.values()
    wrapped = [m.path for m in modules if m.kind is ModuleKind.PARAMETER]
    refuse(adapter, engine, "LoRA on bare parameters (target_parameters)", wrapped, MERGE_HINT)
    refuse(adapter, engine, "trained token rows", list(adapter.token_rows), MERGE_HINT)
    biases = list(adapter.saved_biases)
    refuse(adapter, engine, "trained base biases (bias=all/lora_only)", biases, MERGE_HINT)
    if adapter.merge_refusal is not None:
        # what no merged weight computes, no engine computing W x + s B A x serves either
        raise OptionError(
            f"{engine} cannot serve this adapter: {adapter.merge_refusal}",
            file=adapter.source_path,
            option="engine",
            hint=f"keep it for PEFT ({opt('engine')} peft)",
        )
    if adapter.base_init is not None:
        refuse(
            adapter,
            engine,
            f"factors initialised with {adapter.base_init}, which apply to a residual base",
            [next(iter(adapter.modules), adapter.base_init)],
            f"give the base ({opt('base')}): it is then rewritten for the original base",
        )


def refuse_modules_to_save(adapter: Adapter, engine: str, allowed: tuple[str, ...] = ()) -> None:
    refused = [
        name
        for name in adapter.modules_to_save
        if not any(part in allowed for part in name.split(".")[:-1])
    ]
    what = "modules_to_save" + (f" other than {'/'.join(allowed)}" if allowed else "")
    refuse(adapter, engine, what, refused, MERGE_HINT)


def refuse_kinds(adapter: Adapter, engine: str, kinds: tuple[ModuleKind, ...]) -> None:
    for kind in kinds:
        names = [m.path for m in adapter.modules.values() if m.kind is kind]
        refuse(adapter, engine, f"{kind.value} LoRA modules", names, MERGE_HINT)


def refuse_names(adapter: Adapter, engine: str, served: tuple[str, ...]) -> None:
    names = [m.path for m in adapter.modules.values() if m.name not in served]
    refuse(adapter, engine, f"modules other than {', '.join(served)}", names, MERGE_HINT)


def check_vocabulary(adapter: Adapter, engine: str, base_config: BaseConfig) -> list[str]:
    """Embedding LoRA and saved tables must match the base vocabulary: no added tokens."""
    rows = {
        m.path: m.lora_A.shape[1]
        for m in adapter.modules.values()
        if m.kind is ModuleKind.EMBEDDING
    }
    rows.update({name: t.shape[0] for name, t in adapter.base_tables.items()})
    if not rows:
        return []
    vocab = (base_config or {}).get("vocab_size")
    if vocab is None:
        return [
            f"{engine}: could not check embedding modules for added tokens (pass {opt('base')})"
        ]
    grown = [name for name, count in rows.items() if count != vocab]
    refuse(
        adapter,
        engine,
        f"an embedding with added tokens (base vocabulary {vocab})",
        grown,
        "merge it into the base instead (loramerge merge)",
    )
    return []


def check_saved_tables(adapter: Adapter, engine: str, base: BaseFacts) -> list[str]:
    """An engine that skips the adapter's saved base_layer tables serves the base's own: the
    tables are compared with the base's, value for value, and a difference is refused."""
    if not adapter.base_tables:
        return []
    if base.tensor is None:
        return [
            f"{engine} skips the saved base_layer embedding tables and serves the base's; they "
            f"were not compared with the base (pass {opt('base')} to check them)"
        ]
    differ = []
    for name, table in adapter.base_tables.items():
        found = base.tensor(name)
        if found is None or found.shape != table.shape or not torch.equal(found, table.load()):
            differ.append(name)
    refuse(
        adapter,
        engine,
        "saved base_layer embedding tables that differ from the base's (it serves the base's)",
        differ,
        "merge it into the base instead (loramerge merge)",
    )
    return [f"{engine} skips the saved base_layer embedding tables; compared with the base: equal"]
