"""`loramerge merge` against PEFT: logits in float32, bit-exact single rounding in bf16."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ADAPTERS, BASES, MERGE_CASES, model_logits, peft_logits, token_ids, tree_hashes
from safetensors import safe_open

CASE_IDS = [a for a, _ in MERGE_CASES]


def _merge(cli, adapter, base, out, *extra):
    result = cli("merge", ADAPTERS / adapter, "--base", BASES / base, "-o", out, "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return out


def _tensors(folder):
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                found[name] = handle.get_tensor(name)
    return found


@pytest.mark.parametrize(("adapter", "base"), MERGE_CASES, ids=CASE_IDS)
def test_float32_merge_matches_peft_logits(cli, tmp_path, adapter, base):
    out = _merge(cli, adapter, base, tmp_path / "merged", "--dtype", "float32")
    ids = token_ids(BASES / base)
    expected = peft_logits(ADAPTERS / adapter, BASES / base, ids)
    plain = model_logits(BASES / base, ids)
    assert (expected - plain).abs().max() > 1e-3, "the adapter must change the model"
    got = model_logits(out, ids)
    assert (got - expected).abs().max().item() <= 1e-5


def _reference_weights(adapter, base):
    """Once-rounded float32 reference, evaluated from PEFT's layers with the plain formula."""
    from helpers import load_causal_lm
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_causal_lm(BASES / base), ADAPTERS / adapter)
    reference = {}
    for name, layer in model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.scaling:
            continue
        weight = layer.get_base_layer().weight.detach().float()
        if "default" in layer.lora_A:
            lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        else:
            lora_a, lora_b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        scale = layer.scaling["default"]
        delta = (lora_b.detach() @ lora_a.detach()) * scale
        # GPT-2 Conv1D and embedding tables are stored (in x out); PEFT knows which layer is which
        transposed = getattr(layer, "fan_in_fan_out", False) or "default" not in layer.lora_A
        merged = weight + (delta.T if transposed else delta)
        magnitude = getattr(layer, "lora_magnitude_vector", None)
        if magnitude and "default" in magnitude:
            m = magnitude["default"].weight.detach().reshape(-1).double()
            dim = 0 if transposed else 1
            norms = merged.double().square().sum(dim=dim).sqrt()
            factor = (m / norms).float()
            merged = merged * (factor.reshape(1, -1) if transposed else factor.reshape(-1, 1))
        reference[name + ".weight"] = merged
        lora_bias = (
            getattr(layer.lora_B["default"], "bias", None) if "default" in layer.lora_B else None
        )
        if lora_bias is not None:
            bias = layer.get_base_layer().bias.detach().float()
            reference[name + ".bias"] = bias + lora_bias.detach() * scale
    return reference


@pytest.mark.parametrize(("adapter", "base"), MERGE_CASES, ids=CASE_IDS)
def test_bf16_merge_rounds_once(cli, tmp_path, adapter, base):
    out = _merge(cli, adapter, base, tmp_path / "merged", "--dtype", "bfloat16")
    written = _tensors(out)
    reference = _reference_weights(adapter, base)
    assert reference, "the adapter has LoRA layers"
    for name, value in reference.items():
        # PEFT names modules from the top model; the files may carry the same names
        assert name in written, f"{name} missing from the merged files"
        expected = value.to(torch.bfloat16)
        got = written[name]
        assert got.dtype == torch.bfloat16
        mismatches = int((got.view(torch.int16) != expected.view(torch.int16)).sum())
        assert mismatches == 0, (
            f"{name}: {mismatches} elements differ from the once-rounded reference"
        )


@pytest.mark.parametrize(("adapter", "base"), MERGE_CASES, ids=CASE_IDS)
def test_merge_is_deterministic_and_keeps_layout(cli, tmp_path, adapter, base):
    first = _merge(cli, adapter, base, tmp_path / "a")
    second = _merge(cli, adapter, base, tmp_path / "b")
    assert tree_hashes(first) == tree_hashes(second)
    base_files = sorted(p.name for p in (BASES / base).glob("*.safetensors"))
    assert sorted(p.name for p in first.glob("*.safetensors")) == base_files
    assert not list(first.glob("adapter_*"))
    assert (first / "tokenizer.json").read_bytes() == (BASES / base / "tokenizer.json").read_bytes()


def test_untouched_tensors_are_byte_copies(cli, tmp_path):
    out = _merge(cli, "llama-lora", "llama", tmp_path / "merged")
    merged, original = _tensors(out), _tensors(BASES / "llama")
    untouched = [n for n in original if "proj" not in n]
    assert untouched
    for name in untouched:
        assert torch.equal(merged[name].view(torch.int16), original[name].view(torch.int16))


def test_tied_embeddings_are_untied_when_changed(cli, tmp_path):
    out = _merge(cli, "llama-tied-embedding", "llama-tied", tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    tensors = _tensors(out)
    original = _tensors(BASES / "llama-tied")
    assert "lm_head.weight" in tensors and "lm_head.weight" not in original
    embed = "model.embed_tokens.weight"
    assert torch.equal(tensors["lm_head.weight"], original[embed])
    assert not torch.equal(tensors[embed], original[embed])


def test_index_lists_every_tensor(cli, tmp_path):
    out = _merge(cli, "llama-lora", "llama", tmp_path / "merged")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
