"""torchtune's native adapter_model.pt against torchtune 0.6.1's own logits and merged q/k
weights (fixtures/torchtune, written by fixtures/tools/make_torchtune.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import assert_one_error
from safetensors.torch import load_file
from tool_fixtures import TORCHTUNE, assert_matches_tool

from loramerge.errors import OptionError
from loramerge.formats import torchtune
from loramerge.formats.registry import ReadOptions, detect, read_adapter

BASE = TORCHTUNE / "base"


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["lora", "dora"])
def test_native_checkpoint_as_peft_reproduces_torchtune(cli, tmp_path, name):
    out = tmp_path / name
    weights = TORCHTUNE / name / "adapter_model.pt"
    result = cli("convert", weights, "--to", "peft", "-o", out, "--base", BASE)
    assert result.exit_code == 0, result.output
    assert_matches_tool(out, BASE, TORCHTUNE / name)


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merge_equals_torchtunes_merged_qk(cli, tmp_path, name):
    """torchtune's merged checkpoint agrees with its forward: q/k rows included."""
    out = tmp_path / "merged"
    weights = TORCHTUNE / name / "adapter_model.pt"
    result = cli("merge", weights, "--base", BASE, "-o", out, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    expected = load_file(TORCHTUNE / name / "merged.safetensors")
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=2e-6, msg=key)


def test_names_and_permutation():
    adapter = read_adapter(TORCHTUNE / "lora" / "adapter_model.pt", options=ReadOptions(base=BASE))
    assert adapter.source_format == "torchtune"
    assert set(adapter.modules) >= {
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
        "lm_head",
    }
    native = torch.load(TORCHTUNE / "lora" / "adapter_model.pt", weights_only=True)
    q_proj = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert not torch.equal(q_proj.lora_B.load(), native["layers.0.attn.q_proj.lora_b.weight"])
    v_proj = adapter.modules["model.layers.0.self_attn.v_proj"]  # not rotary: unchanged
    assert torch.equal(v_proj.lora_B.load(), native["layers.0.attn.v_proj.lora_b.weight"])
    assert {m.scale for m in adapter.modules.values()} == {8.0 / 4}


@pytest.mark.oracle
def test_alpha_from_the_option_when_nothing_beside(cli, tmp_path):
    lone = tmp_path / "adapter_model.pt"
    shutil.copyfile(TORCHTUNE / "lora" / "adapter_model.pt", lone)
    result = cli("convert", lone, "--to", "peft", "-o", tmp_path / "out", "--base", BASE)
    assert_one_error(result, str(lone), "stores no lora_alpha", "--alpha")
    out = tmp_path / "with-alpha"
    result = cli("convert", lone, "--to", "peft", "-o", out, "--base", BASE, "--alpha", "8")
    assert result.exit_code == 0, result.output
    assert_matches_tool(out, BASE, TORCHTUNE / "lora")


def test_head_counts_are_asked_for(cli, tmp_path):
    lone = tmp_path / "adapter_model.pt"
    shutil.copyfile(TORCHTUNE / "lora" / "adapter_model.pt", lone)
    result = cli("inspect", lone, "--alpha", "8")
    assert_one_error(result, str(lone), "head counts", "--base")
    shutil.copyfile(BASE / "config.json", tmp_path / "config.json")  # torchtune copies it
    assert cli("inspect", lone, "--alpha", "8").exit_code == 0


def test_alpha_option_must_agree_with_torchtunes_config():
    with pytest.raises(OptionError, match="disagrees"):
        read_adapter(
            TORCHTUNE / "lora" / "adapter_model.pt", options=ReadOptions(alpha=16, base=BASE)
        )


def test_other_model_types_are_refused(tmp_path):
    lone = tmp_path / "adapter_model.pt"
    shutil.copyfile(TORCHTUNE / "lora" / "adapter_model.pt", lone)
    config = json.loads((BASE / "config.json").read_text())
    config["model_type"] = "qwen2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="model_type 'qwen2'"):
        read_adapter(lone, options=ReadOptions(alpha=8))


def test_epoch_folder_holds_two_formats():
    """torchtune's epoch folder holds its native file and its PEFT export: detection refuses
    to choose (the export is wrong for DoRA), naming both."""
    with pytest.raises(Exception, match="claimed by peft and torchtune"):
        detect(TORCHTUNE / "dora")
    assert detect(TORCHTUNE / "dora" / "adapter_model.pt").name == "torchtune"


def test_detection_reads_no_pickle(tmp_path):
    """The sniffer lists the pickle's strings without unpickling: a file whose unpickling
    would run code is still recognised or not by its names alone, and nothing runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "adapter_model.pt"
    torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.zeros(2, 4), "x": Payload()}, path)
    assert torchtune.sniff(path)
    assert not marker.exists()
    assert not torchtune.sniff(TORCHTUNE / "lora" / "adapter_config.json")
