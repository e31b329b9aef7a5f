"""LyCORIS forms with no useful LoRA (full diffs, Kronecker products of high rank) merged through
their dense form: each merged layer gives LyCORIS 4.1.3's own output on its recorded input
(float32), and in bfloat16 every merged weight is the float64 update on the upcast base rounded
once, directly (fixtures/lycoris, fixtures/sd-base)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from dense_reference import round_once
from safetensors.torch import load_file
from sd_fixtures import (
    FIXTURES,
    SD_BASE,
    base_weights,
    geometry,
    kohya_index,
    kohya_module_names,
    layer_inputs,
    reference,
    relative_error,
    where,
)

from loramerge.formats.registry import read_adapter
from loramerge.jobs.merge import merge_adapter
from loramerge.model.plan import Action

LYCORIS = FIXTURES / "lycoris"
TOLERANCE = 1e-5
F64 = torch.float64


def _side(parts: dict[str, torch.Tensor], which: str) -> torch.Tensor:
    full = parts.get(f"lokr_{which}")
    if full is not None:
        return full.to(F64).reshape(full.shape[0], -1)
    up, down = parts[f"lokr_{which}_a"].to(F64), parts[f"lokr_{which}_b"].to(F64)
    return up @ down.reshape(down.shape[0], -1)


def expected_delta(parts: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The module's update in float64 from its stored tensors (LyCORIS's forward)."""
    if "diff" in parts:
        return parts["diff"].to(F64)
    w1, w2 = _side(parts, "w1"), _side(parts, "w2")
    if "lokr_w1" in parts and "lokr_w2" in parts:
        scale = 1.0  # two full sides: LyCORIS ignores alpha
    else:
        rank = (parts.get("lokr_w1_b") if "lokr_w1_b" in parts else parts["lokr_w2_b"]).shape[0]
        scale = float(parts["alpha"]) / rank
    return (torch.kron(w1, w2) * scale).reshape(shape)


def _modules(path, component):
    """(kohya name, stored key of the weight, its parts) of the modules of `component` that the
    reader gave a dense form."""
    adapter = read_adapter(path)
    dense = {(m.component, m.path) for m in adapter.modules.values() if m.dense is not None}
    stored = load_file(path)
    for name in kohya_module_names(path):
        found, module_path = kohya_index()[name]
        if found != component or (found, module_path) not in dense:
            continue
        parts = {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(name + ".")}
        yield name, where(component, module_path).removeprefix(component + "."), parts


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["full", "lokr-full", "lokr-factored"])
def test_dense_forms_merge_exactly(tmp_path, name):
    """The UNet: merging the text encoder's `text_model.` paths into a CLIPTextModel built by
    transformers 5 (which has no such level) is refused for every LyCORIS form alike."""
    component = "unet"
    path = LYCORIS / f"{name}.safetensors"
    modules = list(_modules(path, component))
    assert modules
    ref = reference(path)
    worst = 0.0
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        result = merge_adapter(read_adapter(path), SD_BASE / component, out, dtype=dtype)
        merges = [t for s in result.plan.shards for t in s.tensors if t.action is Action.MERGE]
        assert len([t for t in merges if t.dense]) == len(modules)
        merged = {}
        for shard in out.glob("*.safetensors"):
            merged.update(load_file(shard))
        for kohya_name, key, parts in modules:
            base = base_weights()[f"{component}.{key}.weight"].to(F64)
            weight = base + expected_delta(parts, base.shape)
            got = merged[f"{key}.weight"]
            if dtype == "bfloat16":
                wanted = round_once(weight)
                assert torch.equal(got.view(torch.int16), wanted.view(torch.int16)), key
                continue
            bias = merged.get(f"{key}.bias")
            geo = geometry()[f"{component}.{key}"]
            x = layer_inputs()[f"in.{component}.{key}"]
            if geo["kind"] == "linear":
                out_ = F.linear(x, got, bias)
            else:
                out_ = F.conv2d(x, got, bias, stride=geo["stride"], padding=geo["padding"])
            error = relative_error(out_.to(F64), ref[f"out.{kohya_name}"])
            worst = max(worst, error)
            assert error < TOLERANCE, key
    if os.environ.get("ORACLE_REPORT"):
        print(f"\n{name}: worst merged layer output {worst:.2e} of its largest")
