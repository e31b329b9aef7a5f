"""`loramerge convert`: PEFT and kohya both ways, checked by PEFT's loader (float64), by kohya's
reading rule written here, and by merging against PEFT's merged weights."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import ADAPTERS, BASES, FIXTURES, token_ids
from oracles import (
    PLANTED,
    PeftOracle,
    assert_logits_match,
    base_logits,
    load64,
    logits64,
    logits_with_deltas,
    merged_reference,
    reference_logits,
)
from safetensors import safe_open
from safetensors.torch import load_file

KOHYA = FIXTURES / "kohya" / "llama-lora.safetensors"


def _base_of(name: str) -> Path:
    config = json.loads((ADAPTERS / name / "adapter_config.json").read_text())
    return BASES / config["base_model_name_or_path"].split("/")[-1]


def _assert_means_the_source(source: Path, base: Path, readings: dict) -> None:
    """Each reading (name -> logits, or a function of the token ids) gives PEFT's logits for
    `source` within 5e-7 x its effect; a planted 1e-6 scale error does not."""
    ids = token_ids(base)
    oracle = PeftOracle(source, base)
    expected, planted = oracle.logits(ids), oracle.logits(ids, 1 + PLANTED)
    plain = base_logits(base, ids)
    for what, reading in readings.items():
        assert_logits_match(reading(ids), expected, planted, plain, f"{source.name}: {what}")


@pytest.mark.oracle
@pytest.mark.parametrize(
    "name", ["llama-rslora-patterns", "llama-dora", "gpt2-lora", "llama-tied-embedding"]
)
def test_peft_to_peft_loads_with_peft(cli, tmp_path, name):
    base, out = _base_of(name), tmp_path / name
    result = cli("convert", ADAPTERS / name, "--to", "peft", "-o", out)
    assert result.exit_code == 0, result.output
    _assert_means_the_source(ADAPTERS / name, base, {"PEFT": PeftOracle(out, base).logits})


@pytest.mark.oracle
def test_kohya_to_peft_matches_the_peft_original(cli, tmp_path):
    """The kohya fixture was written by an inline converter independent of loramerge."""
    out = tmp_path / "from-kohya"
    result = cli("convert", KOHYA, "--to", "peft", "-o", out, "--base", BASES / "llama")
    assert result.exit_code == 0, result.output
    llama = BASES / "llama"
    _assert_means_the_source(
        ADAPTERS / "llama-lora", llama, {"PEFT": PeftOracle(out, llama).logits}
    )


def kohya_reading(file: Path, base: Path) -> dict[str, torch.Tensor]:
    """kohya / sd-scripts' rule: `lora_te_<module path with . -> _>`, each module scaled by its
    own `.alpha` over its rank (lora_down's rows); dense float64 updates by weight name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    names = {"lora_te_" + n.replace(".", "_"): n for n, _ in model.named_modules() if n}
    tensors = load_file(file)
    deltas = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            up, alpha = tensors[f"{stem}.lora_up.weight"], float(tensors[f"{stem}.alpha"])
            deltas[names[stem] + ".weight"] = alpha / down.shape[0] * (up.double() @ down.double())
    return deltas


@pytest.mark.oracle
def test_peft_to_kohya_reads_like_the_source_by_kohyas_rule(cli, tmp_path):
    kohya = tmp_path / "rs.safetensors"
    result = cli("convert", ADAPTERS / "llama-rslora-patterns", "--to", "kohya", "-o", kohya)
    assert result.exit_code == 0, result.output
    with safe_open(kohya, "pt") as handle:
        metadata = handle.metadata()
        assert metadata["ss_network_module"] == "networks.lora"
        assert all(k.startswith("lora_te_") for k in handle.keys())  # noqa: SIM118
    llama = BASES / "llama"
    deltas = kohya_reading(kohya, llama)
    assert len(deltas) == 28
    reading = functools.partial(logits_with_deltas, llama, deltas)
    _assert_means_the_source(ADAPTERS / "llama-rslora-patterns", llama, {"kohya's rule": reading})


def test_peft_to_kohya_and_back_self_consistency(cli, tmp_path):
    """Self-consistency (loramerge's kohya writer, then its reader); the oracle tests of the
    same behaviour are the kohya-rule test above and the kohya-fixture test."""
    kohya, back = tmp_path / "rs.safetensors", tmp_path / "back"
    assert (
        cli("convert", ADAPTERS / "llama-rslora-patterns", "--to", "kohya", "-o", kohya).exit_code
        == 0
    )
    assert cli("convert", kohya, "--to", "peft", "-o", back).exit_code == 0
    llama = BASES / "llama"
    _assert_means_the_source(
        ADAPTERS / "llama-rslora-patterns", llama, {"PEFT": PeftOracle(back, llama).logits}
    )


@pytest.mark.oracle
def test_kohya_names_map_without_a_base(cli, tmp_path):
    out = tmp_path / "guessed"
    assert cli("convert", KOHYA, "--to", "peft", "-o", out).exit_code == 0
    with safe_open(out / "adapter_model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    with safe_open(ADAPTERS / "llama-lora" / "adapter_model.safetensors", "pt") as handle:
        assert keys == set(handle.keys())


def test_kohya_refuses_what_it_cannot_hold(cli, tmp_path):
    out = tmp_path / "dora.safetensors"
    result = cli("convert", ADAPTERS / "llama-dora", "--to", "kohya", "-o", out)
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "DoRA" in result.output
    assert not out.exists()


@pytest.mark.oracle
def test_merging_kohya_rounds_like_peft(cli, tmp_path):
    """Merging the kohya fixture (converted from adapters/llama-lora without loramerge) writes
    the bits of PEFT's merge of llama-lora, rounded once to bf16, in every tensor."""
    out = tmp_path / "k"
    result = cli("merge", KOHYA, "--base", BASES / "llama", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    reference = merged_reference(ADAPTERS / "llama-lora", BASES / "llama")
    written = {}
    for shard in out.glob("*.safetensors"):
        written.update(load_file(shard))
    assert set(written) == set(reference)
    for name, value in reference.items():
        expected = value.to(torch.bfloat16).view(torch.int16)
        assert torch.equal(written[name].view(torch.int16), expected), name


@pytest.mark.oracle
def test_installed_console_script_runs_the_readme_job(tmp_path):
    out = tmp_path / "merged"
    done = subprocess.run(
        ["loramerge", "merge", ADAPTERS / "llama-lora", "--base", BASES / "llama", "-o", out],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out} (3 shard(s)")
    # the bf16 folder means PEFT's merge rounded once to bf16: the same weights, so the same
    # logits to the bit (a 1e-6 scale error moves some bf16 roundings, and so the logits)
    ids = token_ids(BASES / "llama")
    reference = merged_reference(ADAPTERS / "llama-lora", BASES / "llama")
    expected = reference_logits(out, reference, torch.bfloat16, ids)
    assert torch.equal(logits64(load64(out), ids), expected)
