"""loramerge's own adapter forward (model/lora_forward.py) against PEFT's live forward, the
reference of docs/rules.md section 1: linear, GPT-2 Conv1D, DoRA, LoRA bias, modules_to_save,
embedding LoRA and saved tables on tied bases."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ADAPTERS,
    BASES,
    MERGE_CASES,
    load_causal_lm,
    model_logits,
    peft_logits,
    token_ids,
)

LOGITS_TOL = 2e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("adapter", "base"), MERGE_CASES)
def test_plain_forward_matches_peft(adapter, base):
    from loramerge.formats.peft import read
    from loramerge.model.lora_forward import PlainForward

    ids = token_ids(BASES / base)
    expected = peft_logits(ADAPTERS / adapter, BASES / base, ids)
    untouched = model_logits(BASES / base, ids)
    assert (expected - untouched).abs().max() > 1e-3, "the adapter changes the model"
    model = load_causal_lm(BASES / base)
    with PlainForward(model, read(ADAPTERS / adapter)), torch.no_grad():
        got = model(ids).logits
    assert (got - expected).abs().max().item() <= LOGITS_TOL
    # leaving the context restores the base model exactly, tied weights included
    with torch.no_grad():
        assert torch.equal(model(ids).logits, untouched)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_conv2d_forward_matches_the_merged_weight(dora):
    """Conv2d: the update s * reshape(B @ A) (DoRA: rescaled per output channel) added live
    equals the layer run with the merged weight."""
    from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind
    from loramerge.model.lora_forward import PlainForward

    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1))
    lora_a = torch.randn(2, 3, 3, 3, generator=generator)
    lora_b = torch.randn(4, 2, 1, 1, generator=generator)
    magnitude = torch.rand(4, generator=generator) + 0.5 if dora else None
    module = LoraModule(
        "0",
        LazyTensor.of(lora_a),
        LazyTensor.of(lora_b),
        alpha=4.0,
        kind=ModuleKind.CONV,
        magnitude=LazyTensor.of(magnitude) if dora else None,
    )
    x = torch.randn(2, 3, 5, 5, generator=generator)
    weight = model[0].weight.detach()
    merged = weight + module.scale * (lora_b.reshape(4, 2) @ lora_a.reshape(2, -1)).reshape(
        weight.shape
    )
    if dora:
        norms = torch.linalg.vector_norm(merged.reshape(4, -1), dim=1)
        merged = merged * (magnitude / norms)[:, None, None, None]
    expected = torch.nn.functional.conv2d(x, merged, model[0].bias, padding=1)
    with PlainForward(model, Adapter(modules={"0": module})), torch.no_grad():
        got = model(x)
    # two float32 routes to the same sums: round-off relative to the outputs' size
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
