"""User errors: exit status 1, one `error:` line naming the file, no traceback, no OUT."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import ADAPTERS, BASES, assert_usage_error


def _assert_user_error(result, out, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def test_missing_adapter(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("merge", tmp_path / "nope", "--base", BASES / "llama", "-o", out)
    _assert_user_error(result, out, "nope", "does not exist")


def test_base_folder_is_not_an_adapter(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("merge", BASES / "llama", "--base", BASES / "llama", "-o", out)
    _assert_user_error(result, out, "base model, not an adapter")


def test_adapter_for_another_architecture(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("merge", ADAPTERS / "gpt2-lora", "--base", BASES / "llama", "-o", out)
    _assert_user_error(result, out, "has no module", "another base model")


def test_shape_mismatch_names_module_and_shapes(cli, tmp_path):
    from loramerge.formats.peft import read
    from loramerge.formats.peft_writer import write

    adapter = read(ADAPTERS / "llama-lora")
    module = next(iter(adapter.modules.values()))
    wide = torch.zeros(module.r, module.lora_A.shape[1] + 3)
    adapter.modules[module.path] = module.with_factors(module.lora_B.load(), wide, module.alpha)
    broken = tmp_path / "broken"
    broken.mkdir()
    write(adapter, broken)
    out = tmp_path / "out"
    result = cli("merge", broken, "--base", BASES / "llama", "-o", out)
    _assert_user_error(result, out, module.path, "another base model", "[")


def test_unsupported_output_dtype(cli, tmp_path):
    out = tmp_path / "out"
    result = cli(
        "merge", ADAPTERS / "llama-lora", "--base", BASES / "llama", "-o", out, "--dtype", "int8"
    )
    assert_usage_error(result, "'--dtype int8'", "float32")
    assert not out.exists()


def test_quantized_base_is_refused(cli, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(BASES / "llama-tied", base)
    tensors = load_file(base / "model.safetensors")
    target = "model.layers.0.self_attn.q_proj.weight"
    tensors[target] = tensors[target].to(torch.int8)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    result = cli("merge", ADAPTERS / "llama-tied-embedding", "--base", base, "-o", out)
    _assert_user_error(result, out, "I8", "dequantize")


def test_existing_out_needs_force(cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("merge", ADAPTERS / "llama-lora", "--base", BASES / "llama", "-o", out)
    assert result.exit_code == 1
    assert "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = cli(
        "merge", ADAPTERS / "llama-lora", "--base", BASES / "llama", "-o", out, "--force", "-q"
    )
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists()


def test_out_inside_input_is_refused(cli, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASES / "llama", base)
    out = base / "merged"
    result = cli("merge", ADAPTERS / "llama-lora", "--base", base, "-o", out)
    _assert_user_error(result, out, "inside the input")


def test_bad_config_json(cli, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "llama-lora", adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    out = tmp_path / "out"
    result = cli("merge", adapter, "--base", BASES / "llama", "-o", out)
    _assert_user_error(result, out, "adapter_config.json", "not valid JSON")


@pytest.mark.parametrize("alpha", [0, -4])
def test_non_positive_alpha(cli, tmp_path, alpha):
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "llama-lora", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = alpha
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = cli("merge", adapter, "--base", BASES / "llama", "-o", out)
    _assert_user_error(result, out, "lora_alpha must be a positive number")


def test_debug_shows_traceback(cli, tmp_path):
    result = cli(
        "merge", tmp_path / "nope", "--base", BASES / "llama", "-o", tmp_path / "o", "--debug"
    )
    assert result.exit_code != 0
    assert result.exception is not None


@pytest.mark.parametrize(
    ("folder", "command"), [("reslora/bs", "loramerge reslora"), ("cola", "loramerge fold")]
)
def test_variant_checkpoints_point_to_their_command(cli, tmp_path, folder, command):
    from helpers import FIXTURES

    out = tmp_path / "out"
    result = cli("merge", FIXTURES / folder, "--base", BASES / "llama", "-o", out)
    _assert_user_error(result, out, command)


@pytest.mark.parametrize(
    "command",
    [
        ("truncate", "{a}", "--method", "svd", "--rank", "2"),
        ("fold", "{a}", "{a}", "--as-lora", "--rank", "2"),
        ("fold", "{a}", "{a}", "--as-lora"),
    ],
    ids=["truncate-svd", "fold-reduced", "fold-exact"],
)
def test_nonfinite_factors_allowed_through_still_stop_svd_with_file_and_module(
    cli, tmp_path, command
):
    """--allow-nonfinite lets NaN through to merges; an SVD or norm cannot take it, and says
    where it is."""
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "nan-lora"
    shutil.copytree(ADAPTERS / "llama-lora", adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in sorted(tensors) if "q_proj.lora_A" in k)
    tensors[name][0, 3] = float("nan")
    save_file(tensors, weights)
    module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    out = tmp_path / "out"
    args = [str(adapter) if part == "{a}" else part for part in command]
    result = cli(*args, "-o", out, "--allow-nonfinite")
    _assert_user_error(result, out, str(adapter), f"module {module}", "NaN", "--allow-nonfinite")
