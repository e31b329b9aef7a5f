"""diffusers' own LoRA files, read and written: checked module by module against what diffusers
0.42.1 itself loads (fixtures/diffusers, written by fixtures/tools/make_diffusers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sd_fixtures import FIXTURES, geometry, output, relative_error, where

from loramerge.errors import FormatError, UnknownFormatError, option_ids
from loramerge.formats import diffusers_keys, diffusers_metadata
from loramerge.formats.registry import detect, read_adapter
from loramerge.io.safetensors_writer import save_tensors
from loramerge.jobs.convert import convert_adapter

DIFFUSERS = FIXTURES / "diffusers"
FOLDERS = ["sd1-peft-keys", "sdxl-converted-keys"]


def _worst_error(adapter, ref: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for module in adapter.modules.values():
        got = output(module, module.component)
        worst = max(worst, relative_error(got, ref[f"out.{where(module.component, module.path)}"]))
    return worst


@pytest.mark.oracle
@pytest.mark.parametrize("name", FOLDERS)
def test_every_module_equals_what_diffusers_loads(name):
    folder = DIFFUSERS / name
    adapter = read_adapter(folder)
    assert adapter.source_format == "diffusers"
    ref = load_file(folder / "reference.safetensors")
    per_module = {k for k in ref if k.startswith("out.") and k[4:] in geometry()}
    assert len(adapter.modules) == len(per_module)
    assert _worst_error(adapter, ref) < 1e-5


def test_rank_and_alpha_patterns_and_rslora_come_from_the_metadata():
    peft_keys = read_adapter(DIFFUSERS / "sd1-peft-keys")
    assert {m.r for m in peft_keys.modules.values()} == {2, 3, 4}
    converted = read_adapter(DIFFUSERS / "sdxl-converted-keys")
    rslora = {m.component for m in converted.modules.values() if m.use_rslora}
    assert rslora == {"text_encoder_2"}


@pytest.mark.parametrize("name", FOLDERS)
def test_written_files_read_back_the_same(tmp_path, name):
    source = read_adapter(DIFFUSERS / name)
    out = tmp_path / "out"
    convert_adapter(DIFFUSERS / name, out, to="diffusers")
    again = read_adapter(out)
    assert sorted(again.modules) == sorted(source.modules)
    for key, module in source.modules.items():
        copy = again.modules[key]
        assert (copy.r, copy.scale, copy.component) == (module.r, module.scale, module.component)
        assert torch.equal(copy.lora_A.load(), module.lora_A.load())
    with safe_open(str(out / diffusers_keys.WEIGHT_NAME), "pt") as handle:
        keys = list(handle.keys())
        flat = json.loads(handle.metadata()[diffusers_metadata.METADATA_KEY])
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)  # one layout
    assert all("." in k and k.split(".")[0] in diffusers_keys.COMPONENTS for k in flat)


def test_kohya_to_diffusers_and_back_keeps_every_key(tmp_path):
    source = FIXTURES / "kohya-sd" / "sd1-lora.safetensors"
    middle, back = tmp_path / "diffusers", tmp_path / "back.safetensors"
    convert_adapter(source, middle, to="diffusers")
    convert_adapter(middle, back, to="kohya")
    before, after = load_file(source), load_file(back)
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


def test_diffusers_to_kohya_uses_the_component_prefixes(tmp_path):
    out = tmp_path / "sdxl.safetensors"
    convert_adapter(DIFFUSERS / "sdxl-converted-keys", out, to="kohya")
    prefixes = {k.split("_text_model")[0].split("_down_blocks")[0] for k in load_file(out)}
    names = {k.split(".")[0] for k in load_file(out)}
    assert any(n.startswith("lora_unet_down_blocks_") for n in names)
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    assert prefixes
    kohya = read_adapter(out)
    source = read_adapter(DIFFUSERS / "sdxl-converted-keys")
    for module in source.modules.values():
        again = kohya.modules[f"{module.component}.{_stored(module)}"]
        assert again.scale == pytest.approx(module.scale, rel=1e-6)


def _stored(module) -> str:
    path = module.path
    if module.component.startswith("text_encoder") and not path.startswith("text_model."):
        path = "text_model." + path
    return path


def test_files_without_metadata_scale_by_one_or_their_alphas(tmp_path):
    tensors = load_file(DIFFUSERS / "sd1-peft-keys" / diffusers_keys.WEIGHT_NAME)
    plain = tmp_path / "plain.safetensors"
    save_tensors(plain, tensors, {"format": "pt"})
    assert {m.scale for m in read_adapter(plain).modules.values()} == {1.0}
    stem = "unet.down_blocks.0.attentions.0.proj_in"
    tensors[f"{stem}.alpha"] = torch.tensor(8.0)
    alphas = tmp_path / "alphas.safetensors"
    save_tensors(alphas, tensors, {"format": "pt"})
    module = read_adapter(alphas).modules[stem]
    assert module.scale == 8.0 / module.r


def test_old_attention_processor_keys(tmp_path):
    tensors = load_file(DIFFUSERS / "sdxl-converted-keys" / diffusers_keys.WEIGHT_NAME)
    renamed = {}
    for key, value in tensors.items():
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            for part in ("down", "up"):
                old = f".{proj}.lora.{part}.weight"
                if key.endswith(old):
                    name = proj.removesuffix(".0")
                    key = key[: -len(old)] + f".processor.{name}_lora.{part}.weight"
        renamed[key] = value
    path = tmp_path / "old.safetensors"
    with safe_open(str(DIFFUSERS / "sdxl-converted-keys" / diffusers_keys.WEIGHT_NAME), "pt") as f:
        metadata = f.metadata()
    save_tensors(path, renamed, metadata)
    assert any(".processor." in k for k in renamed)
    assert sorted(read_adapter(path).modules) == sorted(
        read_adapter(DIFFUSERS / "sdxl-converted-keys").modules
    )


def test_rank_that_contradicts_the_metadata_is_refused(tmp_path):
    source = DIFFUSERS / "sd1-peft-keys" / diffusers_keys.WEIGHT_NAME
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    flat = json.loads(metadata[diffusers_metadata.METADATA_KEY])
    flat["unet.rank_pattern"] = {}
    flat["unet.r"] = 7
    path = tmp_path / "bad.safetensors"
    save_tensors(path, load_file(source), {**metadata, "lora_adapter_metadata": json.dumps(flat)})
    with pytest.raises(FormatError, match="rank 7"):
        read_adapter(path)


def test_a_file_with_kohya_and_diffusers_keys_is_refused_naming_both(tmp_path):
    tensors = load_file(DIFFUSERS / "sd1-peft-keys" / diffusers_keys.WEIGHT_NAME)
    tensors["lora_unet_conv_in.lora_down.weight"] = torch.zeros(1, 4)
    tensors["lora_unet_conv_in.lora_up.weight"] = torch.zeros(8, 1)
    path = tmp_path / "both.safetensors"
    save_tensors(path, tensors, {})
    with pytest.raises(UnknownFormatError, match=r"kohya and diffusers|diffusers and kohya"):
        detect(path)


def test_a_one_model_adapter_needs_its_component_for_diffusers(tmp_path):
    with pytest.raises(FormatError, match="pipeline component") as caught:
        convert_adapter(FIXTURES / "adapters" / "llama-lora", tmp_path / "x", to="diffusers")
    assert option_ids(caught.value.hint) == ["component"]


def test_diffusers_folder_next_to_a_peft_config_is_refused(tmp_path):
    folder = tmp_path / "both"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((FIXTURES / "adapters" / "llama-lora" / name).read_bytes())
    source = DIFFUSERS / "sd1-peft-keys" / diffusers_keys.WEIGHT_NAME
    (folder / diffusers_keys.WEIGHT_NAME).write_bytes(source.read_bytes())
    with pytest.raises(UnknownFormatError, match="peft and diffusers"):
        detect(Path(folder))


def test_truncating_a_diffusers_file_writes_a_diffusers_file(tmp_path):
    from loramerge.jobs.truncate import TruncateOptions, truncate_adapter

    out = tmp_path / "rank2"
    result = truncate_adapter(DIFFUSERS / "sd1-peft-keys", out, TruncateOptions(ranks=(2,)))
    assert result.output == "diffusers"
    again = read_adapter(out)
    assert {m.r for m in again.modules.values()} == {2}
    assert {m.component for m in again.modules.values()} == {"unet", "text_encoder"}
