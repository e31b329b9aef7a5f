"""PEFT tuners other than LoRA: their exact LoRA forms against PEFT's own logits (stored by
fixtures/tools/make_peft_tuners.py with PEFT 0.21.2), and the refusals of the rest."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import BASES, assert_one_error, model_logits
from safetensors import safe_open
from tool_fixtures import PEFT_TUNERS, TOLERANCE, assert_matches_tool, reference

from loramerge.errors import OptionError, UnknownFormatError
from loramerge.formats.registry import ReadOptions, detect, read_adapter

LLAMA = BASES / "llama"
# fixture -> rank of each module in its exact LoRA form
EXACT = {
    "adalora": {  # pruned ranks (PEFT's saved masks); up_proj was pruned to 0 and is dropped
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.self_attn.v_proj": 6,
        "model.layers.1.mlp.down_proj": 2,
    },
    "loha": {  # r^2 (down_proj has r 2 by rank_pattern)
        "model.layers.0.self_attn.q_proj": 16,
        "model.layers.0.self_attn.v_proj": 16,
        "model.layers.1.mlp.down_proj": 4,
        "model.layers.1.mlp.up_proj": 16,
    },
    "lokr-factorised": {p: 4 for p in ("model.layers.0.self_attn.q_proj",)},
    "lokr-full-w1": {  # q_proj: both sides full (4x4, 16x16): rank 4 * 16, the whole matrix
        "model.layers.0.self_attn.q_proj": 64,
        "model.layers.0.self_attn.v_proj": 8,
    },
    "vera": {"model.layers.0.self_attn.q_proj": 8},
    "miss": {"model.layers.0.self_attn.v_proj": 16},
    "delora": {"model.layers.1.mlp.up_proj": 4},
}
MERGE_ONLY = {
    "ia3": "IA3",
    "oft": "OFT",
    "boft": "BOFT",
    "hra": "HRA",
    "fourierft": "FOURIERFT",
    "shira": "SHIRA",
    "c3a": "C3A",
    "randlora": "RANDLORA",
    "miss-bat": "MISS",
}


@pytest.mark.oracle
@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_lora_form_reproduces_peft(cli, tmp_path, name):
    """lokr-full-w1's q_proj is a LoRA of rank 64 on a 64 x 64 matrix: larger than the dense
    update, so convert writes it only when asked to (a cap at its own rank keeps it exact)."""
    out = tmp_path / name
    cap = ["--max-rank", "64"] if name == "lokr-full-w1" else []
    result = cli("convert", PEFT_TUNERS / name, "--to", "peft", "-o", out, "--base", LLAMA, *cap)
    assert result.exit_code == 0, result.output
    assert_matches_tool(out, LLAMA, PEFT_TUNERS / name)
    adapter = read_adapter(out)
    for path, rank in EXACT[name].items():
        assert adapter.modules[path].r == rank, path


def test_adalora_drops_modules_pruned_to_rank_zero():
    adapter = read_adapter(PEFT_TUNERS / "adalora")
    assert "model.layers.1.mlp.up_proj" not in adapter.modules
    assert "up_proj" in adapter.metadata["loramerge.read.notes"]
    # scale lora_alpha / (init_r + 1e-5) = 12 / 6.00001, whatever the pruned rank
    for module in adapter.modules.values():
        assert module.scale == pytest.approx(12 / 6.00001, rel=1e-12)


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["loha", "lokr-full-w1"])
def test_merge_of_an_exact_form_reproduces_peft(cli, tmp_path, name):
    out = tmp_path / "merged"
    result = cli("merge", PEFT_TUNERS / name, "--base", LLAMA, "-o", out, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    ref = reference(PEFT_TUNERS / name)
    logits = model_logits(out, ref["input_ids"])
    top = float(ref["logits"].abs().max())
    assert float((logits - ref["logits"]).abs().max()) / top <= TOLERANCE


@pytest.mark.parametrize("name", sorted(MERGE_ONLY))
def test_tuners_without_a_lora_form_are_refused(cli, tmp_path, name):
    result = cli("convert", PEFT_TUNERS / name, "--to", "peft", "-o", tmp_path / "out")
    assert_one_error(result, str(PEFT_TUNERS / name), f"peft_type {MERGE_ONLY[name]}", "merge-only")
    assert not (tmp_path / "out").exists()


def test_unknown_peft_type_is_refused_naming_it(tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(PEFT_TUNERS / "loha", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["peft_type"] = "SOMETHING_NEW"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="peft_type SOMETHING_NEW is not supported"):
        read_adapter(folder)


@pytest.mark.parametrize("name", ["vera", "miss"])
def test_input_sizes_come_from_the_base(cli, tmp_path, name):
    with pytest.raises(OptionError, match="input size"):
        read_adapter(PEFT_TUNERS / name)
    result = cli("convert", PEFT_TUNERS / name, "--to", "peft", "-o", tmp_path / "out")
    assert_one_error(result, str(PEFT_TUNERS / name), "input size", "--base")


def test_a_full_rank_kronecker_form_is_merge_only_unless_reduced(cli, tmp_path):
    refused = cli("convert", PEFT_TUNERS / "lokr-full-w1", "--to", "peft", "-o", tmp_path / "x")
    assert_one_error(
        refused, "model.layers.0.self_attn.q_proj", "rank 64", "no low-rank form", "--max-rank"
    )
    out = tmp_path / "reduced"
    result = cli(
        "convert",
        PEFT_TUNERS / "lokr-full-w1",
        "--to",
        "peft",
        "-o",
        out,
        "--max-rank",
        "8",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ranks_read"] == [8, 64]
    rows = {row["module"]: row for row in report["reduction"]}
    q_proj = rows["model.layers.0.self_attn.q_proj"]
    assert (q_proj["rank_before"], q_proj["rank_after"]) == (64, 8)
    assert 0 < q_proj["energy_kept"] < 1 and q_proj["relative_error"] > 0
    v_proj = rows["model.layers.0.self_attn.v_proj"]  # at the cap already: kept exactly
    assert (v_proj["rank_after"], v_proj["energy_kept"], v_proj["relative_error"]) == (8, 1.0, 0.0)
    assert max(read_adapter(out).ranks) == 8


def test_energy_reports_what_each_module_keeps(cli, tmp_path):
    out = tmp_path / "reduced.safetensors"
    result = cli("convert", PEFT_TUNERS / "loha", "--to", "kohya", "-o", out, "--energy", "0.99")
    assert result.exit_code == 0, result.output
    assert "energy kept >=" in result.output
    with safe_open(out, "pt") as handle:
        assert any(k.endswith(".lora_down.weight") for k in handle.keys())  # noqa: SIM118


def test_inspect_says_what_was_read(cli):
    result = cli("inspect", PEFT_TUNERS / "lokr-full-w1")
    assert result.exit_code == 0, result.output
    assert "PEFT 0.21.2" in result.output
    assert "LoKr" in result.output and "alpha / r" in result.output


def test_peft_sniffer_claims_every_peft_type():
    for name in ("loha", "ia3", "adalora"):
        assert detect(PEFT_TUNERS / name).name == "peft"


def test_adalora_weights_alone_are_not_taken_for_dylora(tmp_path):
    """AdaLoRA's lora_A / lora_B have no .weight, like DyLoRA's: its lora_E tells them apart."""
    lone = tmp_path / "adapter_model.safetensors"
    shutil.copyfile(PEFT_TUNERS / "adalora" / "adapter_model.safetensors", lone)
    for path in (lone, tmp_path):
        with pytest.raises(UnknownFormatError):
            detect(path)


def test_read_options_reach_the_tuner_reader():
    adapter = read_adapter(PEFT_TUNERS / "vera", options=ReadOptions(base=LLAMA))
    assert adapter.source_format == "peft-vera"
    assert adapter.modules["model.layers.1.mlp.down_proj"].lora_A.shape == (8, 128)


def test_verify_proves_the_conversion(cli, tmp_path):
    """`verify` reads the tuner (with --base for VeRA's input sizes) and finds the converted
    LoRA equal to it, module by module."""
    out = tmp_path / "vera-lora"
    assert (
        cli("convert", PEFT_TUNERS / "vera", "--to", "peft", "-o", out, "--base", LLAMA).exit_code
        == 0
    )
    result = cli("verify", PEFT_TUNERS / "vera", out, "--base", LLAMA)
    assert result.exit_code == 0, result.output


def test_lone_weight_files_are_described(tmp_path):
    lone = tmp_path / "adapter_model.safetensors"
    shutil.copyfile(PEFT_TUNERS / "adalora" / "adapter_model.safetensors", lone)
    with pytest.raises(UnknownFormatError, match="AdaLoRA state dict"):
        detect(lone)
