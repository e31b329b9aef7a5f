"""`loramerge verify`: passes on what means the same, fails naming the worst module otherwise.

The adapters compared are written here with the safetensors package (never loramerge's own
writer); its numbers are checked against float64 formulas, its verdicts against PEFT's logits
and its logits mode against the same forward passes done here."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ADAPTERS, BASES, FIXTURES, assert_usage_error, load_causal_lm, token_ids
from helpers import assert_one_error as _one_error
from oracles import PLANTED, PeftOracle, assert_logits_match, base_logits
from safetensors.torch import load_file, save_file

KOHYA = FIXTURES / "kohya" / "llama-lora.safetensors"
TEXT = FIXTURES / "text" / "eval.txt"
TARGET = "model.layers.1.self_attn.v_proj"


def _copy(tmp_path: Path, name: str, factor: float | None = None, drop: bool = False) -> Path:
    """A byte copy of a fixture folder, then (with the safetensors package, not loramerge) the
    lora_B of the module at TARGET multiplied by `factor`, or the module dropped."""
    folder = tmp_path / f"copy-{name}"
    shutil.copytree(ADAPTERS / name, folder)
    if factor is None and not drop:
        return folder
    tensors = load_file(folder / "adapter_model.safetensors")
    stem = f"base_model.model.{TARGET}"
    if drop:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(stem + ".")}
    else:
        key = f"{stem}.lora_B.weight"
        tensors[key] = (tensors[key].double() * factor).float()
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def _config_scale(config: dict, path: str, rank: int) -> float:
    """PEFT's documented rule: alpha_pattern's first matching key, alpha / r (or / sqrt(r))."""
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def test_identical_copy_passes(cli, tmp_path):
    result = cli("verify", ADAPTERS / "llama-lora", _copy(tmp_path, "llama-lora"))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ") and "28 compared" in result.stdout


def test_one_perturbed_module_fails_naming_it(cli, tmp_path):
    perturbed = _copy(tmp_path, "llama-lora", 1.01)
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
    tiny = _copy(tmp_path, "llama-lora", 1 + 1e-6)
    assert cli("verify", ADAPTERS / "llama-lora", tiny).exit_code == 0
    _one_error(cli("verify", ADAPTERS / "llama-lora", tiny, "--rtol", "0", "--atol", "0"), TARGET)


def test_a_missing_module_fails(cli, tmp_path):
    missing = _copy(tmp_path, "llama-lora", drop=True)
    _one_error(cli("verify", ADAPTERS / "llama-lora", missing), TARGET, "relative 1.000e+00")


@pytest.mark.oracle
def test_difference_norm_matches_a_dense_float64_oracle(tmp_path):
    from loramerge.jobs.verify import verify

    name = "llama-rslora-patterns"
    perturbed = _copy(tmp_path, name, 0.97)
    result = verify(ADAPTERS / name, perturbed)
    row = next(d for d in result.differences if d.name == TARGET)
    config = json.loads((ADAPTERS / name / "adapter_config.json").read_text())
    tensors = load_file(ADAPTERS / name / "adapter_model.safetensors")
    a = tensors[f"base_model.model.{TARGET}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{TARGET}.lora_B.weight"].double()
    b_perturbed = load_file(perturbed / "adapter_model.safetensors")[
        f"base_model.model.{TARGET}.lora_B.weight"
    ].double()
    scale = _config_scale(config, TARGET, a.shape[0])
    assert scale == 32 / math.sqrt(8)  # v_proj: alpha_pattern 32, rank 8, rsLoRA
    update = scale * (b @ a)
    assert row.source_norm == pytest.approx(float(torch.linalg.norm(update)), rel=1e-12)
    difference = scale * (b_perturbed @ a) - update
    assert row.diff_norm == pytest.approx(float(torch.linalg.norm(difference)), rel=1e-9)


def _rewritten(tmp_path: Path, keep_meaning: bool) -> Path:
    """llama-rslora-patterns with use_rslora dropped from its config, by hand: with every
    module's alpha re-expressed as alpha x sqrt(r) (alpha_pattern per module: the same scales),
    or left as it was (every scale changes by sqrt(r))."""
    name = "llama-rslora-patterns"
    folder = tmp_path / ("same" if keep_meaning else "changed")
    shutil.copytree(ADAPTERS / name, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if keep_meaning:
        tensors = load_file(folder / "adapter_model.safetensors")
        pattern = {}
        for key, lora_a in tensors.items():
            if key.endswith(".lora_A.weight"):
                path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                r = lora_a.shape[0]
                pattern[path] = _config_scale(config, path, r) * r
        config["alpha_pattern"] = pattern
    config["use_rslora"] = False
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.oracle
def test_verdicts_agree_with_peft_on_hand_written_rewrites(cli, tmp_path):
    """An rsLoRA adapter rewritten by hand as plain alpha / r: PEFT gives the same logits and
    verify passes; with use_rslora merely dropped, PEFT's logits change and verify fails."""
    source = ADAPTERS / "llama-rslora-patterns"
    llama = BASES / "llama"
    ids = token_ids(llama)
    oracle = PeftOracle(source, llama)
    expected, planted = oracle.logits(ids), oracle.logits(ids, 1 + PLANTED)
    plain = base_logits(llama, ids)
    same, changed = _rewritten(tmp_path, True), _rewritten(tmp_path, False)
    assert_logits_match(PeftOracle(same, llama).logits(ids), expected, planted, plain, "rewrite")
    assert (PeftOracle(changed, llama).logits(ids) - expected).abs().max() > 1e-2
    result = cli("verify", source, same)
    assert result.exit_code == 0, result.output
    assert cli("verify", source, changed).exit_code == 1


@pytest.mark.oracle
def test_reads_across_formats(cli):
    """The kohya fixture was converted from llama-lora by an inline converter, not loramerge."""
    assert cli("verify", ADAPTERS / "llama-lora", KOHYA).exit_code == 0
    result = cli("verify", KOHYA, ADAPTERS / "llama-lora", "--base", BASES / "llama")
    assert result.exit_code == 0, result.output


@pytest.mark.oracle
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
    assert report["mode"] == "logits" and report["passed"] is True
    assert report["logits"]["max_abs_diff"] < 1e-4 and report["logits"]["loss_diff"] < 1e-5
    # what verify reports for the source is what PEFT computes (float32, as verify runs it) on
    # the text's first 128 tokens
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BASES / "llama")
    ids = tokenizer(TEXT.read_text(), return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        live = PeftModel.from_pretrained(load_causal_lm(BASES / "llama"), ADAPTERS / "llama-lora")
        expected = live.eval()(input_ids=ids, labels=ids)
    assert report["logits"]["tokens"] == 128
    top = float(expected.logits.abs().max())
    assert report["logits"]["max_abs_logit"] == pytest.approx(top, rel=1e-5)
    assert report["logits"]["loss_source"] == pytest.approx(float(expected.loss), abs=1e-5)
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
