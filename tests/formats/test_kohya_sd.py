"""kohya files from Stable Diffusion trainers: components kept, module paths resolved from the
architecture's names, every key kept through round trips; checked against sd-scripts' own
forward (fixtures/kohya-sd, written by fixtures/tools/make_kohya_sd.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sd_fixtures import (
    FIXTURES,
    find,
    kohya_index,
    kohya_module_names,
    output,
    reference,
    relative_error,
)

from loramerge.formats.registry import detect, read_adapter
from loramerge.io.safetensors_writer import save_tensors
from loramerge.jobs.convert import convert_adapter
from loramerge.jobs.truncate import TruncateOptions, truncate_adapter

KOHYA_SD = FIXTURES / "kohya-sd"
FILES = ["sd1-lora", "sd1-dylora", "sdxl-te1te2-lora"]


@pytest.mark.oracle
@pytest.mark.parametrize("name", FILES)
def test_every_module_equals_the_sd_scripts_forward(name):
    path = KOHYA_SD / f"{name}.safetensors"
    adapter = read_adapter(path)
    ref = reference(path)
    names = kohya_module_names(path)
    assert len(adapter.modules) == len(names)
    worst = 0.0
    for kohya_name in names:
        component, module_path = kohya_index()[kohya_name]
        module = find(adapter, component, module_path)  # its component and exact path
        assert module.component == component
        worst = max(worst, relative_error(output(module, component), ref[f"out.{kohya_name}"]))
    assert worst < 1e-5


def test_paths_are_exact_without_a_base():
    adapter = read_adapter(KOHYA_SD / "sd1-lora.safetensors")
    paths = {m.path for m in adapter.modules.values()}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj" in paths
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in paths
    assert "text_model.encoder.layers.0.self_attn.q_proj" in paths
    assert "module paths from the architecture" in adapter.metadata["loramerge.read.notes"]


def test_sdxl_te1_te2_are_two_components_with_the_same_paths():
    adapter = read_adapter(KOHYA_SD / "sdxl-te1te2-lora.safetensors")
    q_proj = "text_model.encoder.layers.0.self_attn.q_proj"
    assert f"text_encoder.{q_proj}" in adapter.modules
    assert f"text_encoder_2.{q_proj}" in adapter.modules


def _ldm_file(tmp_path: Path) -> Path:
    """The SDXL-style fixture with its UNet names renamed to LDM names by sd-scripts' own
    rename table (the facts recorded in sdxl-names.json)."""
    pairs = json.loads((KOHYA_SD / "sdxl-names.json").read_text())["diffusers_to_ldm"]
    tensors = load_file(KOHYA_SD / "sdxl-te1te2-lora.safetensors")
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("lora_unet_"):
            name, part = key.split(".", 1)
            body = name[len("lora_unet_") :]
            for old, new in pairs:
                if old in body:
                    body = body.replace(old, new)
                    break
            key = f"lora_unet_{body}.{part}"
        renamed[key] = value
    with safe_open(str(KOHYA_SD / "sdxl-te1te2-lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    path = tmp_path / "ldm.safetensors"
    save_tensors(path, renamed, metadata)
    return path


def test_sdxl_ldm_names_map_to_diffusers_paths_and_back(tmp_path):
    ldm = _ldm_file(tmp_path)
    diffusers_named = read_adapter(KOHYA_SD / "sdxl-te1te2-lora.safetensors")
    adapter = read_adapter(ldm)
    assert sorted(adapter.modules) == sorted(diffusers_named.modules)
    assert any("input_blocks" in k for k in load_file(ldm))
    assert "LDM" in adapter.metadata["loramerge.read.notes"]
    out = tmp_path / "again.safetensors"
    convert_adapter(ldm, out, to="kohya")
    assert_same_tensors(ldm, out)


def assert_same_tensors(source: Path, written: Path) -> None:
    before, after = load_file(source), load_file(written)
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        assert torch.equal(after[key].to(value.dtype), value), key


@pytest.mark.parametrize(
    "source",
    [
        KOHYA_SD / "sd1-lora.safetensors",
        KOHYA_SD / "sdxl-te1te2-lora.safetensors",
        KOHYA_SD / "sd1-dylora.safetensors",
        FIXTURES / "lycoris" / "locon.safetensors",  # text encoder named without text_model_
        FIXTURES / "lycoris" / "sdxl-locon.safetensors",
    ],
    ids=lambda p: p.stem,
)
def test_kohya_to_kohya_keeps_every_key(tmp_path, source):
    out = tmp_path / "out.safetensors"
    convert_adapter(source, out, to="kohya")
    assert_same_tensors(source, out)


def test_truncate_keeps_components_and_names(tmp_path):
    source = KOHYA_SD / "sdxl-te1te2-lora.safetensors"
    out = tmp_path / "rank1.safetensors"
    truncate_adapter(source, out, TruncateOptions(ranks=(1,)))
    assert sorted(load_file(out)) == sorted(load_file(source))


def test_a_text_encoder_only_file_is_a_component_and_an_llm_file_is_not(tmp_path):
    tensors = {
        k: v
        for k, v in load_file(KOHYA_SD / "sd1-lora.safetensors").items()
        if k.startswith("lora_te_")
    }
    path = tmp_path / "te.safetensors"
    save_tensors(path, tensors, {})
    assert {m.component for m in read_adapter(path).modules.values()} == {"text_encoder"}
    llm = read_adapter(FIXTURES / "kohya" / "llama-lora.safetensors")
    assert {m.component for m in llm.modules.values()} == {None}
    assert "model.layers.0.self_attn.q_proj" in llm.modules


def test_sd_kohya_files_are_claimed_by_one_format():
    assert detect(KOHYA_SD / "sd1-lora.safetensors").name == "kohya"
    assert detect(KOHYA_SD / "sd1-dylora.safetensors").name == "kohya-dylora"


def test_inspect_says_what_each_reader_read():
    from loramerge.jobs.inspect import inspect

    for path, tool, rule in (
        (KOHYA_SD / "sd1-lora.safetensors", "kohya sd-scripts", "alpha / r"),
        (FIXTURES / "lycoris" / "lokr-full.safetensors", "LyCORIS", "LoKr with both sides full"),
        (FIXTURES / "lycoris" / "dylora.safetensors", "LyCORIS", "alpha / n for n blocks"),
        (FIXTURES / "diffusers" / "sd1-peft-keys", "diffusers", "lora_adapter_metadata"),
    ):
        report = inspect(path)
        assert tool in report.read_as["tool"] and rule in report.read_as["rule"], path
        assert "components" in report.read_as["notes"]
