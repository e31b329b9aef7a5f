"""PEFT tuners with no low-rank form (IA3, OFT, BOFT, HRA, MiSS "bat", FourierFT, SHiRA, C3A,
RandLoRA) merged into their base: against PEFT 0.21.2's own float32 logits stored beside each
fixture (fixtures/peft-tuners/<tuner>/reference.safetensors), and in bfloat16 against the
float64 formulas of tests/dense_reference.py applied to the upcast base and rounded once."""

from __future__ import annotations

import json
import os

import dense_reference as ref
import pytest
import torch
from helpers import BASES, assert_one_error, model_logits
from safetensors.torch import load_file
from tool_fixtures import MOVES_AT_LEAST, PEFT_TUNERS, TOLERANCE, reference

from loramerge.formats.registry import read_adapter

LLAMA = BASES / "llama"
DENSE = ["boft", "c3a", "fourierft", "hra", "ia3", "miss-bat", "oft", "randlora", "shira"]
PREFIX = "base_model.model."


def merged_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def expected_weight(name: str, module: str, weight: torch.Tensor) -> torch.Tensor:
    """W' in float64 for one module of fixture `name`, from its saved tensors and config."""
    folder = PEFT_TUNERS / name
    config = json.loads((folder / "adapter_config.json").read_text())
    saved = load_file(folder / "adapter_model.safetensors")

    def get(param: str) -> torch.Tensor:
        key = f"{PREFIX}{module}.{param}"
        return saved[key] if key in saved else saved[key + ".weight"]

    if name == "ia3":
        feedforward = any(module.endswith(m) for m in config["feedforward_modules"])
        return ref.ia3(weight, get("ia3_l"), feedforward)
    if name == "oft":
        terms = config["num_cayley_neumann_terms"] if config["use_cayley_neumann"] else None
        return ref.oft(weight, get("oft_R"), terms)
    if name == "boft":
        return ref.boft(weight, get("boft_R"), get("boft_s"))
    if name == "hra":
        return ref.hra(weight, get("hra_u"), bool(config.get("apply_GS")))
    if name == "miss-bat":
        return ref.miss_bat(weight, get("miss_block"))
    if name == "fourierft":
        seed, scaling = config["random_loc_seed"], config["scaling"]
        return ref.fourier(weight, get("fourierft_spectrum"), seed, scaling)
    if name == "shira":
        return ref.scatter(weight, get("shira_indices"), get("shira_weight"))
    if name == "c3a":
        return ref.circulant(weight, get("c3a_kernel"))
    assert name == "randlora"
    scale = config["randlora_alpha"] / config["r"]
    bases = saved[f"{PREFIX[:-6]}randlora_A"], saved[f"{PREFIX[:-6]}randlora_B"]
    return ref.randlora(weight, *bases, get("randlora_lambda"), get("randlora_gamma"), scale)


@pytest.mark.oracle
@pytest.mark.parametrize("name", DENSE)
def test_float32_merge_gives_peft_s_logits(cli, tmp_path, name):
    out = tmp_path / "merged"
    result = cli("merge", PEFT_TUNERS / name, "--base", LLAMA, "-o", out, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    stored = reference(PEFT_TUNERS / name)
    ids, expected = stored["input_ids"], stored["logits"]
    top = float(expected.abs().max())
    error = float((model_logits(out, ids) - expected).abs().max()) / top
    moved = float((model_logits(LLAMA, ids) - expected).abs().max()) / top
    if os.environ.get("ORACLE_REPORT"):
        print(f"\n{name}: error {error:.2e} of the largest logit, adapter moves {moved:.2e}")
    assert moved > MOVES_AT_LEAST, f"the adapter barely moves the logits ({moved:.2e})"
    assert error <= TOLERANCE, f"logits differ from PEFT's by {error:.2e} of the largest"


@pytest.mark.oracle
@pytest.mark.parametrize("name", DENSE)
def test_bfloat16_merge_is_the_float64_rule_rounded_once(cli, tmp_path, name):
    """Every merged bf16 weight is the float64 formula on the upcast bf16 base rounded once to
    bfloat16 (directly: torch's own conversion goes through float32, which differs where the
    float32 value falls exactly halfway between two bfloat16 values, once in MiSS "bat" here);
    every other tensor is the base's."""
    out = tmp_path / "merged"
    result = cli("merge", PEFT_TUNERS / name, "--base", LLAMA, "-o", out)
    assert result.exit_code == 0, result.output
    merged, base = merged_tensors(out), merged_tensors(LLAMA)
    modules = set(read_adapter(PEFT_TUNERS / name).dense_updates)
    assert modules
    for key, value in merged.items():
        module = key.removesuffix(".weight")
        if module not in modules:
            assert torch.equal(value, base[key]), key
            continue
        wanted = expected_weight(name, module, base[key].to(torch.float64))
        assert value.dtype == torch.bfloat16
        assert torch.equal(value.view(torch.int16), ref.round_once(wanted).view(torch.int16)), key
        assert not torch.equal(value, base[key]), f"{key}: the update rounded away entirely"


@pytest.mark.parametrize("name", DENSE)
def test_convert_and_engines_refuse_them_naming_the_method(cli, tmp_path, name):
    config = json.loads((PEFT_TUNERS / name / "adapter_config.json").read_text())
    peft_type = config["peft_type"]
    out = tmp_path / "out"
    result = cli("convert", PEFT_TUNERS / name, "--to", "peft", "-o", out)
    assert_one_error(result, str(PEFT_TUNERS / name), f"peft_type {peft_type}", "merge-only")
    result = cli("convert", PEFT_TUNERS / name, "--engine", "vllm", "-o", out)
    assert_one_error(result, f"peft_type {peft_type}", "loramerge merge")
    result = cli("truncate", PEFT_TUNERS / name, "--rank", "2", "-o", tmp_path / "t")
    assert_one_error(result, f"peft_type {peft_type}", "merge-only")
    assert not out.exists() and not (tmp_path / "t").exists()


def test_engine_profiles_refuse_dense_updates():
    from loramerge.engines.profiles import apply_engine
    from loramerge.errors import OptionError

    adapter = read_adapter(PEFT_TUNERS / "oft")
    for engine, to in (("peft", "peft"), ("vllm", "peft"), ("llama.cpp", "gguf")):
        with pytest.raises(OptionError, match="cannot serve OFT: it has no LoRA form"):
            apply_engine(adapter, engine, to)


def test_inspect_reports_the_rule_and_measures_it_against_the_base(cli):
    result = cli("inspect", PEFT_TUNERS / "shira", "--base", LLAMA, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["module_count"] == 4 and report["ranks"] == []
    rows = {row["path"]: row for row in report["modules"]}
    row = rows["model.layers.0.self_attn.q_proj"]
    assert row["rule"] == "SHiRA scatter" and row["merge_only"]
    assert row["update_norm"] > 0 and row["relative_update"] > 0
    # sparse: the share rounding kept is over the positions SHiRA trains, not the whole weight
    assert row["changed_share"] > 0.9
    assert any("can only be merged" in w for w in report["warnings"])
    assert "SHiRA" in report["read_as"]["algorithm"]


def test_a_dense_update_that_does_not_fit_the_base_is_refused(cli, tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "c3a"
    shutil.copytree(PEFT_TUNERS / "c3a", folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = f"{PREFIX}model.layers.0.self_attn.v_proj.c3a_kernel"
    tensors[key] = torch.zeros(4, 4, 16)  # 64 outputs; v_proj has 32
    save_file(tensors, folder / "adapter_model.safetensors")
    result = cli("merge", folder, "--base", LLAMA, "-o", tmp_path / "m")
    assert_one_error(result, "v_proj", "C3A here has 64 outputs", "[32, 64]")
    assert not (tmp_path / "m").exists()


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["ia3", "oft"])
def test_a_base_transformers_cannot_build_merges_by_names(cli, tmp_path, name):
    """Without an architecture (here: an unknown model type), module kinds and tensor names come
    from the files' names; the merged weights are the same float64 rule rounded once."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "llama-from-elsewhere"
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    result = cli("merge", PEFT_TUNERS / name, "--base", base, "-o", out)
    assert result.exit_code == 0, result.output
    merged, stored = merged_tensors(out), merged_tensors(LLAMA)
    for module in read_adapter(PEFT_TUNERS / name).dense_updates:
        key = f"{module}.weight"
        wanted = expected_weight(name, module, stored[key].to(torch.float64))
        assert torch.equal(merged[key].view(torch.int16), ref.round_once(wanted).view(torch.int16))
