"""`loramerge verify`: passes on what means the same, fails naming the worst module otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ADAPTERS, BASES, FIXTURES, assert_usage_error
from helpers import assert_one_error as _one_error

KOHYA = FIXTURES / "kohya" / "llama-lora.safetensors"
TEXT = FIXTURES / "text" / "eval.txt"
TARGET = "model.layers.1.self_attn.v_proj"


def _copy(tmp_path: Path, name: str, change=None) -> Path:
    """A PEFT copy of a fixture, with `change(module)` applied to the module at TARGET."""
    from loramerge.formats.peft import read, write

    adapter = read(ADAPTERS / name)
    if change is not None:
        adapter.modules[TARGET] = change(adapter.modules[TARGET])
    folder = tmp_path / f"copy-{name}"
    folder.mkdir()
    write(adapter, folder)
    return folder


def _scaled_b(factor: float):
    def change(module):
        b, a = module.lora_B.load(), module.lora_A.load()
        return module.with_factors(b * factor, a, module.alpha)

    return change


def test_identical_copy_passes(cli, tmp_path):
    result = cli("verify", ADAPTERS / "llama-lora", _copy(tmp_path, "llama-lora"))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ") and "28 compared" in result.stdout


def test_one_perturbed_module_fails_naming_it(cli, tmp_path):
    perturbed = _copy(tmp_path, "llama-lora", _scaled_b(1.01))
    result = cli("verify", ADAPTERS / "llama-lora", perturbed)
    _one_error(result, TARGET, "relative 1.000e-02")
    as_json = cli("verify", ADAPTERS / "llama-lora", perturbed, "--json")
    assert as_json.exit_code == 1
    report = json.loads(as_json.stdout)
    assert report["passed"] is False and report["worst"]["name"] == TARGET
    # every other module is identical
    others = [row for row in report["modules"] if row["name"] != TARGET]
    assert len(others) == 27 and all(row["diff_norm"] == 0.0 for row in others)


def test_tolerances_decide(cli, tmp_path):
    tiny = _copy(tmp_path, "llama-lora", _scaled_b(1 + 1e-6))
    assert cli("verify", ADAPTERS / "llama-lora", tiny).exit_code == 0
    _one_error(cli("verify", ADAPTERS / "llama-lora", tiny, "--rtol", "0", "--atol", "0"), TARGET)


def test_a_missing_module_fails(cli, tmp_path):
    from loramerge.formats.peft import read, write

    adapter = read(ADAPTERS / "llama-lora")
    del adapter.modules[TARGET]
    folder = tmp_path / "missing"
    folder.mkdir()
    write(adapter, folder)
    _one_error(cli("verify", ADAPTERS / "llama-lora", folder), TARGET, "relative 1.000e+00")


def test_difference_norm_matches_a_dense_float64_oracle(tmp_path):
    from loramerge.formats.peft import read
    from loramerge.jobs.verify import verify

    perturbed = _copy(tmp_path, "llama-rslora-patterns", _scaled_b(0.97))
    result = verify(ADAPTERS / "llama-rslora-patterns", perturbed)
    row = next(d for d in result.differences if d.name == TARGET)
    module = read(ADAPTERS / "llama-rslora-patterns").modules[TARGET]
    b, a = module.lora_B.load().double(), module.lora_A.load().double()
    update = module.scale * (b @ a)
    assert row.source_norm == pytest.approx(float(torch.linalg.norm(update)), rel=1e-12)
    assert row.diff_norm == pytest.approx(float(torch.linalg.norm(0.03 * update)), rel=1e-6)


def test_reads_across_formats(cli):
    assert cli("verify", ADAPTERS / "llama-lora", KOHYA).exit_code == 0
    result = cli("verify", KOHYA, ADAPTERS / "llama-lora", "--base", BASES / "llama")
    assert result.exit_code == 0, result.output


def test_logits_against_the_merged_folder(cli, tmp_path):
    merged = tmp_path / "merged"
    result = cli(
        "merge", ADAPTERS / "llama-lora", "--base", BASES / "llama", "-o", merged,
        "--dtype", "float32", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    args = ("--base", BASES / "llama", "--text", TEXT)
    result = cli("verify", ADAPTERS / "llama-lora", merged, *args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "logits" and report["logits"]["max_abs_diff"] < 1e-4
    assert report["logits"]["loss_diff"] < 1e-5
    # a different adapter's merge does not pass
    other = cli("verify", ADAPTERS / "llama-rslora-patterns", merged, *args)
    _one_error(other, "logits at token")


def test_option_errors(cli, tmp_path):
    merged = BASES / "llama"  # any model folder
    result = cli("verify", ADAPTERS / "llama-lora", merged)
    assert_usage_error(result, "merged model", "--base and --text")
    result = cli("verify", ADAPTERS / "llama-lora", ADAPTERS / "llama-lora", "--text", TEXT)
    assert_usage_error(result, "'--text'", "needs --base")
    assert_usage_error(cli("verify", ADAPTERS / "llama-lora", merged, "--rtol", "-1"), "'--rtol")
    _one_error(cli("verify", ADAPTERS / "llama-lora", tmp_path / "nope"), "does not exist")
