"""`loramerge merge` against PEFT: logits in float32, bit-exact single rounding in bf16."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ADAPTERS, BASES, MERGE_CASES, token_ids, tree_hashes
from oracles import (
    PLANTED,
    PeftOracle,
    assert_logits_match,
    base_logits,
    effect_tolerance,
    load64,
    logits64,
    merged_reference,
    reference_logits,
)
from safetensors import safe_open

F32 = torch.float32

CASE_IDS = [a for a, _ in MERGE_CASES]


def _merge(cli, adapter, base, out, *extra):
    result = cli("merge", ADAPTERS / adapter, "--base", BASES / base, "-o", out, "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return out


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16) if tensor.element_size() == 2 else tensor.view(torch.int32)


def _tensors(folder):
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                found[name] = handle.get_tensor(name)
    return found


@pytest.mark.oracle
@pytest.mark.parametrize(("adapter", "base"), MERGE_CASES, ids=CASE_IDS)
def test_float32_merge_matches_peft_logits(cli, tmp_path, adapter, base):
    """The float32 merged folder, loaded by transformers, gives the logits of PEFT's merged
    weights (float64 forward both), within 1e-8 x the adapter's effect; the same reference with
    every scale off by 1e-6 falls outside that. The reference itself agrees with PEFT's live
    forward up to the float32 rounding of the merged weights (1e-6 x the effect)."""
    out = _merge(cli, adapter, base, tmp_path / "merged", "--dtype", "float32")
    ids = token_ids(BASES / base)
    live = PeftOracle(ADAPTERS / adapter, BASES / base).logits(ids)
    plain = base_logits(BASES / base, ids)
    expected = reference_logits(out, merged_reference(ADAPTERS / adapter, BASES / base), F32, ids)
    planted = reference_logits(
        out, merged_reference(ADAPTERS / adapter, BASES / base, 1 + PLANTED), F32, ids
    )
    rounding, _ = effect_tolerance(live, plain, 1e-6)  # float32 rounding of merged weights
    assert (expected - live).abs().max() <= rounding, "the reference is not PEFT's model"
    got = logits64(load64(out), ids)
    # the merge writes the reference's bits (next test), so nothing but float64 evaluation
    # noise may separate the two: 1e-8 x the effect (a 1e-6 scale error on the smallest LoRA
    # part here, o_proj beside a replaced embedding table, moves the logits by 3.8e-7 x)
    assert_logits_match(got, expected, planted, plain, f"{adapter} merged in float32", 1e-8)


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("adapter", "base"), MERGE_CASES, ids=CASE_IDS)
def test_merge_rounds_every_tensor_once(cli, tmp_path, adapter, base, dtype):
    """Every tensor the merge writes (merged LoRA layers, DoRA, lora_bias biases,
    modules_to_save replacements, an untied head, copied and cast tensors) has the bits of
    PEFT's float32 value rounded once to the output dtype, and no tensor is missing or extra."""
    out = _merge(cli, adapter, base, tmp_path / "merged", "--dtype", dtype)
    written = _tensors(out)
    reference = merged_reference(ADAPTERS / adapter, BASES / base)
    assert set(written) == set(reference)
    original = {name: value.float() for name, value in _tensors(BASES / base).items()}
    changed = [
        n for n, v in reference.items() if n not in original or not torch.equal(v, original[n])
    ]
    assert changed, "the adapter must change some tensor"
    target = getattr(torch, dtype)
    for name, value in reference.items():
        expected, got = value.to(target), written[name]
        assert got.dtype == target, name
        mismatches = int((_bits(got) != _bits(expected)).sum())
        assert mismatches == 0, f"{name}: {mismatches} elements differ from the once-rounded value"


@pytest.mark.parametrize(("adapter", "base"), MERGE_CASES, ids=CASE_IDS)
def test_merge_is_deterministic_and_keeps_layout(cli, tmp_path, adapter, base):
    first = _merge(cli, adapter, base, tmp_path / "a")
    second = _merge(cli, adapter, base, tmp_path / "b")
    assert tree_hashes(first) == tree_hashes(second)
    base_files = sorted(p.name for p in (BASES / base).glob("*.safetensors"))
    assert sorted(p.name for p in first.glob("*.safetensors")) == base_files
    assert not list(first.glob("adapter_*"))
    assert (first / "tokenizer.json").read_bytes() == (BASES / base / "tokenizer.json").read_bytes()


@pytest.mark.oracle
def test_untouched_tensors_are_byte_copies(cli, tmp_path):
    out = _merge(cli, "llama-lora", "llama", tmp_path / "merged")
    merged, original = _tensors(out), _tensors(BASES / "llama")
    untouched = [n for n in original if "proj" not in n]
    assert untouched
    for name in untouched:
        assert torch.equal(merged[name].view(torch.int16), original[name].view(torch.int16))


@pytest.mark.oracle
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
