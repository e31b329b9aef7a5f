"""`loramerge verify ADAPTER MERGED --base BASE`: a merged folder compared weight by weight,
streamed. The oracle is PEFT: folders PEFT merged itself (`merge_and_unload`, saved by
transformers) pass, PEFT's merge of the adapter at another scale fails, and folders changed
here with the safetensors package fail naming what was changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ADAPTERS, BASES
from helpers import assert_one_error as _one_error
from safetensors.torch import load_file, save_file

LLAMA = BASES / "llama"
TARGET = "model.layers.1.self_attn.v_proj"


def _peft_merged(tmp_path: Path, adapter: Path, base: Path, dtype: torch.dtype) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out = tmp_path / f"peft-{adapter.name}-{str(dtype).removeprefix('torch.')}"
    merged.save_pretrained(out)
    return out


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("adapter", "base", "dtype"),
    [
        ("llama-lora", "llama", torch.float32),
        ("llama-lora", "llama", torch.bfloat16),  # PEFT adds a bf16-rounded update: two roundings
        ("llama-rslora-patterns", "llama", torch.bfloat16),
        ("llama-dora", "llama", torch.float32),
        ("gpt2-lora", "gpt2", torch.float32),  # Conv1D: updates stored transposed
        ("llama-modules-to-save", "llama", torch.float32),
    ],
)
def test_peft_s_own_merges_pass(cli, tmp_path, adapter, base, dtype):
    folder = _peft_merged(tmp_path, ADAPTERS / adapter, BASES / base, dtype)
    result = cli("verify", ADAPTERS / adapter, folder, "--base", BASES / base, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "weights" and report["passed"] is True
    changed = [row for row in report["modules"] if row["source_norm"] > 0]
    assert changed, "the adapter changes some weights"


@pytest.mark.oracle
def test_peft_s_merge_at_another_scale_fails(cli, tmp_path):
    """PEFT merges a copy whose lora_alpha is 1% larger; compared with the original adapter, the
    first module the merge writes differs by about 1% of its update."""
    adapter = tmp_path / "alpha"
    shutil.copytree(ADAPTERS / "llama-lora", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] *= 1.01
    config.pop("alpha_pattern", None)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    folder = _peft_merged(tmp_path, adapter, LLAMA, torch.float32)
    result = cli("verify", ADAPTERS / "llama-lora", folder, "--base", LLAMA, "--json")
    assert result.exit_code == 1
    worst = json.loads(result.stdout)["worst"]
    assert worst["relative"] == pytest.approx(0.01, rel=0.05)


def _changed(tmp_path: Path, name: str, element: int, ulps: int) -> Path:
    """loramerge's bf16 merge, copied, with one element of tensor `name` moved by `ulps` units
    in the last place (with the safetensors package)."""
    merged = tmp_path / f"merged-{ulps}"
    assert cli_merge(merged) == 0
    for path in merged.glob("*.safetensors"):
        tensors = load_file(path)
        if name in tensors:
            flat = tensors[name].view(torch.int16).reshape(-1).clone()
            flat[element] += ulps
            tensors[name] = flat.view(torch.bfloat16).reshape(tensors[name].shape)
            save_file(tensors, path, metadata={"format": "pt"})
            return merged
    raise AssertionError(name)


def cli_merge(out: Path) -> int:
    from loramerge_cli.app import app
    from typer.testing import CliRunner

    args = ["merge", str(ADAPTERS / "llama-lora"), "--base", str(LLAMA), "-o", str(out), "-q"]
    return CliRunner().invoke(app, args).exit_code


@pytest.mark.oracle  # the difference is planted here, its size known
def test_one_changed_weight_fails_naming_its_module(cli, tmp_path):
    folder = _changed(tmp_path, f"{TARGET}.weight", element=5, ulps=8)
    result = cli("verify", ADAPTERS / "llama-lora", folder, "--base", LLAMA)
    _one_error(result, TARGET, "differs from")


@pytest.mark.oracle  # the difference is planted here, its size known
def test_an_untouched_tensor_must_hold_the_base_s_values(cli, tmp_path):
    folder = _changed(tmp_path, "model.norm.weight", element=0, ulps=2)
    result = cli("verify", ADAPTERS / "llama-lora", folder, "--base", LLAMA)
    _one_error(result, "model.norm.weight", "differs from")


@pytest.mark.oracle  # the difference is planted here, its size known
def test_one_unit_in_the_last_place_counts_as_rounding(cli, tmp_path):
    folder = _changed(tmp_path, f"{TARGET}.weight", element=5, ulps=1)
    result = cli("verify", ADAPTERS / "llama-lora", folder, "--base", LLAMA, "--json")
    assert result.exit_code == 0, result.output


def test_a_missing_tensor_is_named(cli, tmp_path):
    folder = tmp_path / "merged"
    assert cli_merge(folder) == 0
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        if f"{TARGET}.weight" in tensors:
            del tensors[f"{TARGET}.weight"]
            save_file(tensors, path, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][f"{TARGET}.weight"]
    index.write_text(json.dumps(data))
    result = cli("verify", ADAPTERS / "llama-lora", folder, "--base", LLAMA)
    _one_error(result, f"lacks {TARGET}.weight")


def test_every_byte_is_compared_with_progress(tmp_path):
    from loramerge.jobs.verify import verify

    folder = tmp_path / "merged"
    assert cli_merge(folder) == 0
    seen: list[tuple[int, int]] = []
    result = verify(ADAPTERS / "llama-lora", folder, base=LLAMA, progress=lambda *a: seen.append(a))
    assert result.passed and result.mode == "weights"
    # every tensor's bytes: each file less its 8-byte length and the JSON header it gives
    data = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            data += path.stat().st_size - 8 - int.from_bytes(handle.read(8), "little")
    done, total = seen[-1]
    assert done == total == data
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
