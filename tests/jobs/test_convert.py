"""`loramerge convert`: PEFT and kohya both ways, checked by PEFT's loader and by merging."""

from __future__ import annotations

import json
import subprocess

import torch
from helpers import ADAPTERS, BASES, FIXTURES, model_logits, peft_logits, token_ids, tree_hashes
from safetensors import safe_open

KOHYA = FIXTURES / "kohya" / "llama-lora.safetensors"


def test_peft_roundtrip_loads_with_peft(cli, tmp_path):
    for name in ("llama-rslora-patterns", "llama-dora", "gpt2-lora", "llama-tied-embedding"):
        base = (
            BASES
            / json.loads((ADAPTERS / name / "adapter_config.json").read_text())[
                "base_model_name_or_path"
            ].split("/")[-1]
        )
        out = tmp_path / name
        result = cli("convert", ADAPTERS / name, "--to", "peft", "-o", out)
        assert result.exit_code == 0, result.output
        ids = token_ids(base)
        expected = peft_logits(ADAPTERS / name, base, ids)
        got = peft_logits(out, base, ids)
        assert (got - expected).abs().max().item() <= 1e-6, name


def test_kohya_to_peft_matches_the_peft_original(cli, tmp_path):
    out = tmp_path / "from-kohya"
    result = cli("convert", KOHYA, "--to", "peft", "-o", out, "--base", BASES / "llama")
    assert result.exit_code == 0, result.output
    ids = token_ids(BASES / "llama")
    expected = peft_logits(ADAPTERS / "llama-lora", BASES / "llama", ids)
    got = peft_logits(out, BASES / "llama", ids)
    assert (got - expected).abs().max().item() <= 1e-6


def test_kohya_names_map_without_a_base(cli, tmp_path):
    out = tmp_path / "guessed"
    assert cli("convert", KOHYA, "--to", "peft", "-o", out).exit_code == 0
    with safe_open(out / "adapter_model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    with safe_open(ADAPTERS / "llama-lora" / "adapter_model.safetensors", "pt") as handle:
        assert keys == set(handle.keys())


def test_peft_to_kohya_and_back(cli, tmp_path):
    kohya = tmp_path / "rs.safetensors"
    result = cli("convert", ADAPTERS / "llama-rslora-patterns", "--to", "kohya", "-o", kohya)
    assert result.exit_code == 0, result.output
    with safe_open(kohya, "pt") as handle:
        metadata = handle.metadata()
        assert metadata["ss_network_module"] == "networks.lora"
        assert all(k.startswith("lora_te_") for k in handle.keys())  # noqa: SIM118
    back = tmp_path / "back"
    assert cli("convert", kohya, "--to", "peft", "-o", back).exit_code == 0
    ids = token_ids(BASES / "llama")
    expected = peft_logits(ADAPTERS / "llama-rslora-patterns", BASES / "llama", ids)
    assert (peft_logits(back, BASES / "llama", ids) - expected).abs().max().item() <= 1e-5


def test_kohya_refuses_what_it_cannot_hold(cli, tmp_path):
    out = tmp_path / "dora.safetensors"
    result = cli("convert", ADAPTERS / "llama-dora", "--to", "kohya", "-o", out)
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "DoRA" in result.output
    assert not out.exists()


def test_merging_kohya_equals_merging_peft(cli, tmp_path):
    for source, out in ((KOHYA, tmp_path / "k"), (ADAPTERS / "llama-lora", tmp_path / "p")):
        result = cli("merge", source, "--base", BASES / "llama", "-o", out, "-q")
        assert result.exit_code == 0, result.output
    assert tree_hashes(tmp_path / "k") == tree_hashes(tmp_path / "p")


def test_installed_console_script_runs_the_readme_job(tmp_path):
    out = tmp_path / "merged"
    done = subprocess.run(
        ["loramerge", "merge", ADAPTERS / "llama-lora", "--base", BASES / "llama", "-o", out],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out} (3 shard(s)")
    ids = token_ids(BASES / "llama")
    # the bf16 merge is close to PEFT's live float32 model, within bf16 rounding of the weights
    expected = peft_logits(ADAPTERS / "llama-lora", BASES / "llama", ids)
    assert (model_logits(out, ids) - expected).abs().max().item() < 0.1
    assert torch.isfinite(model_logits(out, ids)).all()
