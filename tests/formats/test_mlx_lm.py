"""mlx-lm adapter folders, in and out, against mlx-lm 0.32.2's own logits and fused weights
(fixtures/mlx-lm, written by fixtures/tools/make_mlx_lm.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import BASES, assert_one_error
from safetensors.torch import load_file
from tool_fixtures import MLX_LM, PEFT_TUNERS, assert_matches_tool

from loramerge.errors import FormatError
from loramerge.formats import mlx_lm_writer
from loramerge.formats.registry import detect, read_adapter
from loramerge.io.safetensors_header import read_header

LLAMA = BASES / "llama"
FIXTURES = ["lora", "dora", "lora-scale"]


def _layout(path) -> dict:
    return {name: (e.dtype, list(e.shape)) for name, e in read_header(path).entries.items()}


@pytest.mark.oracle
@pytest.mark.parametrize("name", FIXTURES)
def test_mlx_adapter_as_peft_reproduces_mlx(cli, tmp_path, name):
    out = tmp_path / name
    result = cli("convert", MLX_LM / name, "--to", "peft", "-o", out)
    assert result.exit_code == 0, result.output
    assert_matches_tool(out, LLAMA, MLX_LM / name)


def test_scale_is_the_multiplier_and_lm_head_is_read():
    adapter = read_adapter(MLX_LM / "lora-scale")
    assert adapter.source_format == "mlx-lm"
    head = adapter.modules["lm_head"]
    assert head.r == 8 and head.scale == 2.5 and head.alpha == 20.0
    assert head.lora_A.shape == (8, 64) and head.lora_B.shape == (320, 8)


def test_dora_magnitudes_are_read():
    adapter = read_adapter(MLX_LM / "dora")
    assert all(m.magnitude is not None for m in adapter.modules.values())
    assert {m.scale for m in adapter.modules.values()} == {10.0}


@pytest.mark.parametrize("name", FIXTURES)
def test_mlx_roundtrip_keeps_mlx_layout(cli, tmp_path, name):
    """Written back as mlx-lm: the same tensors (names, dtypes, shapes, values) as mlx-lm's."""
    out = tmp_path / name
    result = cli("convert", MLX_LM / name, "--to", "mlx-lm", "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    assert _layout(out / "adapters.safetensors") == _layout(MLX_LM / name / "adapters.safetensors")
    ours, theirs = (
        load_file(out / "adapters.safetensors"),
        load_file(MLX_LM / name / "adapters.safetensors"),
    )
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    config = json.loads((out / "adapter_config.json").read_text())
    original = json.loads((MLX_LM / name / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == original["fine_tune_type"]
    for key in ("rank", "scale", "dropout"):
        assert config["lora_parameters"][key] == original["lora_parameters"][key]
    adapter = read_adapter(MLX_LM / name)
    assert config["lora_parameters"]["keys"] == sorted(adapter.modules)


@pytest.mark.oracle
def test_other_adapters_written_for_mlx_keep_their_meaning(cli, tmp_path):
    """LoHa's exact form has ranks 4 and 16 and three scales: mlx-lm takes one rank and one
    scale, so ranks are zero-padded and scales folded into lora_b; reading it back and
    loading it in PEFT still gives PEFT's LoHa logits."""
    out = tmp_path / "loha-mlx"
    result = cli("convert", PEFT_TUNERS / "loha", "--to", "mlx-lm", "-o", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 16
    back = tmp_path / "back"
    assert cli("convert", out, "--to", "peft", "-o", back).exit_code == 0
    assert_matches_tool(back, LLAMA, PEFT_TUNERS / "loha")


def test_writer_refuses_what_mlx_cannot_hold(tmp_path):
    from dataclasses import replace

    adapter = read_adapter(MLX_LM / "dora")
    first = next(iter(adapter.modules))
    mixed = dict(adapter.modules)
    mixed[first] = replace(mixed[first], magnitude=None)
    with pytest.raises(FormatError, match="DoRA and plain LoRA"):
        mlx_lm_writer.config_and_tensors(replace(adapter, modules=mixed))
    plain = read_adapter(MLX_LM / "lora")
    module = next(iter(plain.modules.values()))
    biased = {**plain.modules, module.path: replace(module, bias=module.magnitude or module.lora_B)}
    with pytest.raises(FormatError, match="LoRA biases"):
        mlx_lm_writer.config_and_tensors(replace(plain, modules=biased))


def test_mlx_folders_are_not_taken_for_peft(tmp_path):
    assert detect(MLX_LM / "lora").name == "mlx-lm"
    assert detect(MLX_LM / "lora" / "adapters.safetensors").name == "mlx-lm"
    # an mlx-lm weight file beside a PEFT config is evidence of both: refused naming both
    folder = tmp_path / "both"
    shutil.copytree(MLX_LM / "lora", folder)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(Exception, match="claimed by peft and mlx-lm"):
        detect(folder)


def test_config_scale_is_required(cli, tmp_path):
    folder = tmp_path / "alpha-only"
    shutil.copytree(MLX_LM / "lora", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_parameters"] = {"rank": 4, "alpha": 16, "dropout": 0.0}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    result = cli("inspect", folder)
    assert_one_error(result, str(folder / "adapter_config.json"), "no scale")


def test_inspect_says_what_was_read(cli):
    result = cli("inspect", MLX_LM / "dora")
    assert result.exit_code == 0, result.output
    assert "mlx-lm" in result.output and "lora_b^T" in result.output and "DoRA" in result.output
