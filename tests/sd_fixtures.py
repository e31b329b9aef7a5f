"""The Stable Diffusion fixtures (fixtures/sd-base, lycoris, kohya-sd, diffusers) as an oracle:
per-module outputs of loramerge's reading of an adapter, against the tool's own recorded outputs
on the same inputs. Plain torch: no diffusers, LyCORIS or sd-scripts needed."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from loramerge.adapter import Adapter, LoraModule, ModuleKind

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SD_BASE = FIXTURES / "sd-base"
COMPONENT_FILES = {
    "unet": SD_BASE / "unet" / "diffusion_pytorch_model.safetensors",
    "text_encoder": SD_BASE / "text_encoder" / "model.safetensors",
    "text_encoder_2": SD_BASE / "text_encoder_2" / "model.safetensors",
}
KOHYA_PREFIXES = {  # a fact of the tools, restated here independently of loramerge
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}


@lru_cache(maxsize=1)
def base_weights() -> dict[str, torch.Tensor]:
    """'<component>.<tensor name>' -> tensor of the fixture pipeline."""
    return {f"{c}.{k}": v for c, f in COMPONENT_FILES.items() for k, v in load_file(f).items()}


@lru_cache(maxsize=1)
def geometry() -> dict[str, dict]:
    return json.loads((SD_BASE / "modules.json").read_text())


@lru_cache(maxsize=1)
def layer_inputs() -> dict[str, torch.Tensor]:
    return load_file(SD_BASE / "reference.safetensors")


@lru_cache(maxsize=1)
def kohya_index() -> dict[str, tuple[str, str]]:
    """kohya module name -> (component, module path), both CLIP text-encoder forms."""
    index = {}
    for stored in geometry():
        component, path = stored.split(".", 1)
        for prefix, owner in KOHYA_PREFIXES.items():
            if owner == component:
                index[f"{prefix}_{path.replace('.', '_')}"] = (component, path)
                if path.startswith("text_model."):
                    short = path[len("text_model.") :]
                    index[f"{prefix}_{short.replace('.', '_')}"] = (component, path)
    return index


def find(adapter: Adapter, component: str | None, path: str) -> LoraModule:
    found = [
        m
        for m in adapter.modules.values()
        if m.path == path and (component is None or m.component in (component, None))
    ]
    assert len(found) == 1, f"{component}.{path}: {len(found)} modules"
    return found[0]


def where(component: str, path: str) -> str:
    """'<component>.<path>' as the fixture pipeline stores it: text-encoder paths written under
    transformers >= 5 lack the `text_model.` level the stored weights have."""
    if f"{component}.{path}" not in geometry() and f"{component}.text_model.{path}" in geometry():
        path = "text_model." + path
    return f"{component}.{path}"


def merged_weight(module: LoraModule, component: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') in float64 by loramerge's model of the module (docs/rules.md section 1)."""
    where_ = where(component, module.path)
    weight = base_weights()[f"{where_}.weight"].to(torch.float64)
    bias = base_weights().get(f"{where_}.bias")
    lora_b, lora_a = (t.to(torch.float64) for t in module.factors())
    delta = (module.scale * (lora_b @ lora_a)).reshape(weight.shape)
    assert module.kind is (ModuleKind.CONV if weight.ndim == 4 else ModuleKind.LINEAR), where_
    assert tuple(module.lora_A.shape[1:]) == (
        tuple(weight.shape[1:]) if weight.ndim == 4 else (weight.shape[1],)
    ), where_
    merged = weight + delta
    if module.magnitude is not None:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        factor = module.magnitude.float().to(torch.float64) / norm
        merged = merged * factor.reshape(-1, *[1] * (merged.ndim - 1))
    if bias is not None:
        bias = bias.to(torch.float64)
        if module.bias is not None:
            bias = bias + module.scale * module.bias.float().to(torch.float64)
    return merged, bias


def output(module: LoraModule, component: str) -> torch.Tensor:
    """The module's output on its fixed reference input, with the adapter applied."""
    where_ = where(component, module.path)
    weight, bias = merged_weight(module, component)
    geo = geometry()[where_]
    x = layer_inputs()[f"in.{where_}"].to(torch.float64)
    if geo["kind"] == "linear":
        return F.linear(x, weight, bias)
    return F.conv2d(
        x, weight, bias, stride=geo["stride"], padding=geo["padding"],
        dilation=geo["dilation"], groups=geo["groups"],
    )  # fmt: skip


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.to(torch.float64)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def reference(path: Path) -> dict[str, torch.Tensor]:
    """A kohya-style fixture's recorded tool outputs (`<name>.ref.safetensors`)."""
    return load_file(path.with_name(path.name.removesuffix(".safetensors") + ".ref.safetensors"))


def kohya_module_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return sorted({key.split(".", 1)[0] for key in handle.keys()})  # noqa: SIM118
