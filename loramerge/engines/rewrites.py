"""Exact adapter rewrites that the engine profiles are built from: each leaves what the adapter
computes unchanged (scales folded into B, ranks zero-padded, zero modules added). What an engine
cannot serve is refused by loramerge.engines.refusals.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule

if TYPE_CHECKING:
    pass
from loramerge.errors import OptionError, opt

# SGLang concatenates these per layer into one stacked buffer: all members, at one rank.
SGLANG_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_LAYER = re.compile(r"^(?P<head>.*?\.)(?P<index>\d+)(?P<tail>\..+)$")

BaseConfig = Mapping[str, Any] | None


def plain_scales(adapter: Adapter) -> Adapter:
    """rsLoRA modules re-expressed with plain alpha / r scaling: alpha' = scale * r (exact)."""
    modules = {
        path: replace(m, alpha=m.scale * m.r, use_rslora=False) if m.use_rslora else m
        for path, m in adapter.modules.items()
    }
    return replace(adapter, modules=modules)


def common_scale(modules: list[LoraModule]) -> float:
    """The scale most modules already have (ties: the larger), so most B stay untouched."""
    counts = Counter(m.scale for m in modules)
    return max(counts, key=lambda s: (counts[s], s))


def rescale(module: LoraModule, scale: float, rank: int | None = None) -> LoraModule:
    """The same update written with `scale` (folded into B) at `rank` (zero-padded), no rsLoRA.

    Padding adds zero rows to A and zero columns to B: exact. Folding multiplies B by
    old_scale / scale, computed in float64 and rounded once; 16-bit B are written in float32
    so that the fold costs no more than one float32 rounding.
    """
    rank = module.r if rank is None else rank
    ratio = module.scale / scale
    lora_b, lora_a = module.lora_B, module.lora_A
    if ratio != 1.0:
        b = lora_b.load()
        dtype = b.dtype if b.dtype in (torch.float32, torch.float64) else torch.float32
        lora_b = LazyTensor.of((b.to(torch.float64) * ratio).to(dtype))
    if rank != module.r:
        pad = rank - module.r
        a, b = lora_a.load(), lora_b.load()
        a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], dim=1)
        lora_a, lora_b = LazyTensor.of(a), LazyTensor.of(b)
    return replace(module, lora_A=lora_a, lora_B=lora_b, alpha=scale * rank, use_rslora=False)


def one_scale(adapter: Adapter, uniform_rank: bool) -> tuple[Adapter, list[str]]:
    """Every module at one scale (so config lora_alpha / r is right everywhere), optionally at
    one rank (the largest, zero-padded)."""
    modules = list(adapter.modules.values())
    if not modules:
        return adapter, []
    scale = common_scale(modules)
    top = max(m.r for m in modules)
    rewritten = {m.path: rescale(m, scale, top if uniform_rank else None) for m in modules}
    notes = []
    folded = [m.path for m in modules if m.scale != scale]
    if folded:
        notes.append(
            f"folded per-module scales into lora_B of {len(folded)} module(s) so that "
            f"one scale {scale:.6g} serves all"
        )
    if any(m.use_rslora for m in modules):
        notes.append("rsLoRA scales re-expressed as lora_alpha / r")
    padded = [m.path for m in modules if uniform_rank and m.r != top]
    if padded:
        notes.append(f"zero-padded {len(padded)} module(s) to rank {top} (exact)")
    return replace(adapter, modules=rewritten), notes


def split_layer(path: str) -> tuple[str, int] | None:
    """('model.layers.{}.self_attn.q_proj', 3) for a module inside a numbered layer."""
    match = _LAYER.match(path)
    if match is None:
        return None
    return match["head"] + "{}" + match["tail"], int(match["index"])


def llama_shape(name: str, config: BaseConfig) -> tuple[int, int] | None:
    """(out, in) of a LLaMA-family projection from the base config, when it says enough."""
    config = config or {}
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inter = int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return None
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }.get(name)


def add_zero_modules(
    adapter: Adapter, wanted: list[str], engine: str, base_config: BaseConfig
) -> tuple[Adapter, list[str]]:
    """Zero LoRA modules (exact: they change nothing) at the paths in `wanted` that are missing.

    Shapes come from the same projection in another layer, else from the base config.
    """
    missing = [path for path in wanted if path not in adapter.modules]
    if not missing:
        return adapter, []
    by_template: dict[str, LoraModule] = {}
    for module in adapter.modules.values():
        split = split_layer(module.path)
        if split is not None:
            by_template.setdefault(split[0], module)
    modules = dict(adapter.modules)
    # the profiles call this after one_scale: copy the rank and alpha every module now has
    rank = Counter(m.r for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    for path in missing:
        template = split_layer(path)
        like = by_template.get(template[0]) if template else None
        name = path.rsplit(".", 1)[-1]
        if like is not None:
            shape = (like.lora_B.shape[0], like.lora_A.shape[1])
            dtype = like.lora_A.dtype
        elif (shape := llama_shape(name, base_config)) is not None:
            dtype = torch.float32
        else:
            raise OptionError(
                f"{engine} needs a LoRA on {name} beside the other projections of its layer, "
                "and its shape is unknown",
                file=adapter.source_path,
                module=path,
                hint=f"pass {opt('base')} so that loramerge can add an exact zero module",
            )
        zeros_a = torch.zeros(rank, shape[1], dtype=dtype)
        zeros_b = torch.zeros(shape[0], rank, dtype=dtype)
        modules[path] = LoraModule(path, LazyTensor.of(zeros_a), LazyTensor.of(zeros_b), alpha)
    note = (
        f"added {len(missing)} zero LoRA module(s) that {engine} needs (exact), e.g. {missing[0]}"
    )
    return replace(adapter, modules=modules), [note]


def layer_indices(adapter: Adapter) -> dict[str, list[int]]:
    """Per layer template (`model.layers.{}.self_attn.q_proj`), the layer indices it covers."""
    found: dict[str, list[int]] = {}
    for module in adapter.modules.values():
        split = split_layer(module.path)
        if split is not None:
            found.setdefault(split[0], []).append(split[1])
    return found


def every_layer(adapter: Adapter, base_config: BaseConfig) -> list[str]:
    """Paths each targeted projection needs so that it covers every layer (TGI and LoRAX drop a
    projection entirely when one layer lacks it)."""
    found = layer_indices(adapter)
    if not found:
        return []
    layers = max(i for indices in found.values() for i in indices) + 1
    layers = max(layers, int((base_config or {}).get("num_hidden_layers") or 0))
    return [template.format(i) for template in found for i in range(layers)]


def stacked_groups(adapter: Adapter) -> list[str]:
    """Paths SGLang needs so that each layer holds whole q/k/v and gate/up groups."""
    wanted = []
    for module in adapter.modules.values():
        for group in SGLANG_GROUPS:
            if module.name in group:
                stem = module.path[: -len(module.name)]
                wanted += [stem + member for member in group]
    return sorted(set(wanted))
