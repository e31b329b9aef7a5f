"""The rewrite of each engine in loramerge.engines.profiles.ENGINES, built from the exact
rewrites of loramerge.engines.rewrites and the refusals of loramerge.engines.refusals.

Keys: the PEFT writer always writes `base_model.model.<path>.lora_A.weight` (no adapter name),
which is what TGI and LoRAX require and what vLLM and SGLang accept; no profile changes that.
"""

from __future__ import annotations

from dataclasses import replace

from loramerge.adapter import Adapter, ModuleKind, common_alpha
from loramerge.engines.profiles import VLLM_MAX_LORA_RANKS, BaseFacts, Profiled, vllm_max_lora_rank
from loramerge.engines.refusals import (
    check_saved_tables,
    check_vocabulary,
    refuse,
    refuse_dora_and_bias,
    refuse_kinds,
    refuse_modules_to_save,
    refuse_names,
    refuse_peft_only,
)
from loramerge.engines.rewrites import (
    add_zero_modules,
    every_layer,
    one_scale,
    plain_scales,
    stacked_groups,
)
from loramerge.errors import OptionError

VLLM_SAVED_HEADS = ("classifier", "score")
TGI_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft(adapter: Adapter, base: BaseFacts) -> Profiled:
    notes = []
    if len({m.use_rslora for m in adapter.modules.values()}) > 1:
        adapter = plain_scales(adapter)
        notes.append("mixed rsLoRA and plain modules re-expressed as lora_alpha / r (exact)")
    return Profiled("peft", adapter, tuple(notes))


def vllm(adapter: Adapter, base: BaseFacts) -> Profiled:
    refuse_peft_only(adapter, "vLLM")
    refuse_dora_and_bias(adapter, "vLLM")
    refuse_modules_to_save(adapter, "vLLM", VLLM_SAVED_HEADS)
    refuse_kinds(adapter, "vLLM", (ModuleKind.CONV,))
    notes = check_vocabulary(adapter, "vLLM", base.config)
    top = max((m.r for m in adapter.modules.values()), default=1)
    choice = vllm_max_lora_rank(top)
    if choice is None:
        largest = max(adapter.modules.values(), key=lambda m: m.r)
        raise OptionError(
            f"vLLM cannot serve rank {top}: its largest max-lora-rank is {VLLM_MAX_LORA_RANKS[-1]}",
            file=adapter.source_path,
            module=largest.path,
            option="engine",
            value="vllm",
            hint="reduce the rank first (loramerge truncate)",
        )
    # vLLM computes one scale from the config's r and lora_alpha: make it right everywhere.
    adapter, changed = one_scale(adapter, uniform_rank=False)
    notes += check_saved_tables(adapter, "vLLM", base)
    notes += changed
    return Profiled("vllm", adapter, tuple(notes), {"max_lora_rank": choice})


def _tgi_like(engine: str, label: str, adapter: Adapter, base: BaseFacts) -> Profiled:
    refuse_peft_only(adapter, label)
    refuse_dora_and_bias(adapter, label)
    refuse_modules_to_save(adapter, label)
    refuse_names(adapter, label, TGI_MODULES)
    adapter, notes = one_scale(adapter, uniform_rank=True)
    adapter, added = add_zero_modules(
        adapter, every_layer(adapter, base.config), label, base.config
    )
    return Profiled(engine, adapter, tuple(notes + added))


def tgi(adapter: Adapter, base: BaseFacts) -> Profiled:
    return _tgi_like("tgi", "TGI", adapter, base)


def lorax(adapter: Adapter, base: BaseFacts) -> Profiled:
    return _tgi_like("lorax", "LoRAX", adapter, base)


def sglang(adapter: Adapter, base: BaseFacts) -> Profiled:
    refuse_peft_only(adapter, "SGLang")
    refuse_dora_and_bias(adapter, "SGLang")
    refuse_modules_to_save(adapter, "SGLang")
    refuse_kinds(adapter, "SGLang", (ModuleKind.CONV,))
    notes = check_vocabulary(adapter, "SGLang", base.config)
    adapter, changed = one_scale(adapter, uniform_rank=True)
    adapter, added = add_zero_modules(adapter, stacked_groups(adapter), "SGLang", base.config)
    return Profiled("sglang", adapter, tuple(notes + changed + added))


def llama_cpp(adapter: Adapter, base: BaseFacts) -> Profiled:
    refuse_peft_only(adapter, "llama.cpp")
    refuse_dora_and_bias(adapter, "llama.cpp")
    refuse_modules_to_save(adapter, "llama.cpp")
    refuse_kinds(adapter, "llama.cpp", (ModuleKind.CONV, ModuleKind.CONV1D))
    notes = check_vocabulary(adapter, "llama.cpp", base.config)
    if (base.config or {}).get("tie_word_embeddings"):
        tied = [m.path for m in adapter.modules.values() if m.name == "lm_head"]
        refuse(
            adapter,
            "llama.cpp",
            "lm_head LoRA on a base with tied embeddings",
            tied,
            "merge it into the base instead (loramerge merge)",
        )
    if adapter.base_tables:
        notes += check_saved_tables(adapter, "llama.cpp", base)
        adapter = replace(adapter, base_tables={})
    adapter = plain_scales(adapter)
    if common_alpha(list(adapter.modules.values())) is None:
        notes.append("scales differ between modules: folded into lora_b, no adapter.lora.alpha")
    return Profiled("llama.cpp", adapter, tuple(notes))
