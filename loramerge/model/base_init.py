"""Adapters whose training changed the base (PiSSA, OLoRA, KaSA saved without PEFT's conversion)
rewritten for the original base, from the base's own weights (docs/rules.md section 1)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from loramerge.adapter import Adapter, LoraModule, ModuleKind
from loramerge.errors import FormatError
from loramerge.io.safetensors_reader import SafetensorsReader
from loramerge.model.fit import fit_adapter
from loramerge.model.folder import BaseModel
from loramerge.model.stored_tensors import StoredTensors
from loramerge.ops.initial_factors import kasa_factors, olora_factors, pissa_factors, residual_form


def _initial(method: str, weight: torch.Tensor, module: LoraModule, where: str | None):
    """(B0, A0) in the update's orientation (out x r, r x in) from the stored weight."""
    stored_transposed = module.kind is ModuleKind.CONV1D  # stored (in x out)
    if method == "pissa":  # PEFT decomposes W in the (out x in) orientation
        oriented = weight.T if stored_transposed else weight
        return pissa_factors(oriented.contiguous(), module.r, module.scale)
    if method == "kasa" and module.r >= min(weight.shape):
        raise FormatError(
            f"KaSA needs a rank below {min(weight.shape)}, the smaller side of the weight",
            file=where,
            module=module.path,
        )
    # OLoRA and KaSA decompose the weight as stored
    initial_b, initial_a = (
        olora_factors(weight, module.r)
        if method == "olora"
        else kasa_factors(weight, module.r, module.scale)
    )
    if stored_transposed:
        return initial_a.T.contiguous(), initial_b.T.contiguous()
    return initial_b, initial_a


def rebuild_for_original_base(adapter: Adapter, base: BaseModel) -> Adapter:
    """Each module as [B | -B0] @ [A ; A0] at the same scale (rank 2r): on the original base it
    computes what PEFT computes on the residual base it rebuilds at load time."""
    method = adapter.base_init
    if method is None:
        return adapter
    fitted = fit_adapter(adapter, base)
    stored = StoredTensors(base, fitted)
    located = base.locate()
    modules = {}
    for path, module in fitted.adapter.modules.items():
        if module.kind not in (ModuleKind.LINEAR, ModuleKind.CONV1D):
            raise FormatError(
                f"was initialised with {method}, which loramerge rebuilds for Linear and Conv1D "
                f"weights only; this module is {module.kind.value}",
                file=adapter.source_path,
                module=path,
            )
        name = stored.whole_tensor(fitted.targets[path].param)
        shard, _ = located[name]
        with SafetensorsReader(base.shard_path(shard)) as reader:
            weight = reader.read(name).to(torch.float32)
        initial_b, initial_a = _initial(method, weight, module, adapter.source_path)
        lora_b, lora_a = module.factors()
        lora_b, lora_a = residual_form(lora_b, lora_a, initial_b, initial_a)
        # twice the rank at the same scale: alpha doubles (times sqrt(2) with rsLoRA)
        alpha = module.alpha * (math.sqrt(2.0) if module.use_rslora else 2.0)
        modules[path] = module.with_factors(lora_b, lora_a, alpha)
    config = dict(adapter.source_config)
    config.pop("kasa_config", None)
    if method != "kasa":
        config["init_lora_weights"] = True
    return replace(fitted.adapter, modules=modules, base_init=None, source_config=config)
