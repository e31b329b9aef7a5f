"""LyCORIS files read as plain LoRAs, checked module by module against LyCORIS 4.1.3's own
forward on the fixture pipeline (fixtures/lycoris, written by fixtures/tools/make_lycoris.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sd_fixtures import (
    FIXTURES,
    base_weights,
    find,
    kohya_index,
    kohya_module_names,
    merged_weight,
    output,
    reference,
    relative_error,
)

from loramerge.errors import FormatError, UnknownFormatError
from loramerge.formats import lycoris
from loramerge.formats.derived_factors import merge_only_modules
from loramerge.formats.registry import detect, read_adapter
from loramerge.io.safetensors_writer import save_tensors
from loramerge.ops.rank_truncation import truncate_prefix

LYCORIS = FIXTURES / "lycoris"
PLAIN = [
    "locon",
    "locon-tucker",
    "loha",
    "loha-tucker",
    "lokr-factored",
    "lokr-full",
    "lokr-tucker",
    "full",
    "sdxl-locon",
    "sdxl-lokr",
]
DORA = ["locon-dora", "loha-dora"]
TOLERANCE = 1e-5  # float32 tool outputs; the rules reproduce them to < 1e-6


def _base_weight(key, module):
    return base_weights()[f"{module.component}.{module.path}.weight"]


def _read(name: str):
    adapter = read_adapter(LYCORIS / f"{name}.safetensors")
    if lycoris.needs_dora_fold(adapter):
        adapter = lycoris.fold_dora_epsilon(adapter, _base_weight)
    return adapter


def _worst_error(adapter, path: Path, prefix: str = "out") -> float:
    ref = reference(path)
    names = kohya_module_names(path)
    assert len(adapter.modules) == len(names)
    worst = 0.0
    for name in names:
        component, module_path = kohya_index()[name]
        module = find(adapter, component, module_path)
        worst = max(worst, relative_error(output(module, component), ref[f"{prefix}.{name}"]))
    return worst


@pytest.mark.oracle
@pytest.mark.parametrize("name", PLAIN + DORA)
def test_every_module_equals_the_lycoris_forward(name):
    adapter = _read(name)
    assert adapter.source_format == "lycoris"
    assert _worst_error(adapter, LYCORIS / f"{name}.safetensors") < TOLERANCE


@pytest.mark.oracle
def test_loha_and_lokr_merge_to_apply_the_scale_twice_and_the_forward_wins():
    """LyCORIS 4.1.3's merge_to multiplies by alpha / r twice for LoHa and factored LoKr; the
    reader follows the forward, so the tool's merged delta is (alpha / r) times ours."""
    doubled = 0
    for name in ("loha", "lokr-factored"):
        adapter = _read(name)
        ref = reference(LYCORIS / f"{name}.safetensors")
        for key in (k for k in ref if k.startswith("merge_to.")):
            kohya_name = key.split(".")[1]
            component, module_path = kohya_index()[kohya_name]
            module = find(adapter, component, module_path)
            weight = base_weights()[f"{component}.{module_path}.weight"].to(torch.float64)
            ours = merged_weight(module, component)[0] - weight
            theirs = ref[key].to(torch.float64) - weight
            # a LoKr with two full sides has scale 1, where applying it twice changes nothing
            assert relative_error(theirs, module.scale * ours) < 1e-4, key
            doubled += module.scale != 1.0
    assert doubled >= 4


def test_loha_is_a_lora_of_rank_r_squared_and_lokr_of_the_product_of_ranks():
    loha = _read("loha")
    assert {m.r for m in loha.modules.values()} == {4}  # r = 2 on both Hadamard sides
    lokr = _read("lokr-factored")
    module = lokr.modules["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    assert module.r == 2 * 2  # lokr_w1_a/b and lokr_w2_a/b both of rank 2
    full = _read("lokr-full")
    fc1 = full.modules["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    assert fc1.r == 4 * 8 and fc1.scale == 1.0  # two full sides: numerical ranks, scale 1


def test_full_updates_and_high_rank_forms_are_merge_only():
    full = merge_only_modules(_read("full"))
    assert len(full) == 25 and all("dense update" in why for why in full.values())
    assert len(merge_only_modules(_read("lokr-full"))) == 24  # Kronecker products of full rank
    factored = merge_only_modules(_read("lokr-factored"))
    assert "unet.down_blocks.0.attentions.0.proj_in" in factored  # two full 2x2 and 4x4 sides
    assert "no low-rank form" in factored["unet.down_blocks.0.attentions.0.proj_in"]
    assert not merge_only_modules(_read("loha"))  # rank 4 on layers of 8 and more
    assert not merge_only_modules(_read("locon-tucker"))


def test_full_bias_differences_are_kept():
    adapter = _read("full")
    module = adapter.modules["unet.conv_in"]
    assert module.bias is not None and module.scale == 1.0
    _, bias = merged_weight(module, "unet")
    base_bias = base_weights()["unet.conv_in.bias"].to(torch.float64)
    assert float((bias - base_bias).abs().max()) > 0


@pytest.mark.oracle
def test_lycoris_dylora_uses_its_block_scale_at_every_rank():
    path = LYCORIS / "dylora.safetensors"
    adapter = read_adapter(path)
    assert adapter.source_format == "lycoris-dylora"
    assert adapter.metadata["dylora.unit"] == "2"
    ref = reference(path)
    assert _worst_error(adapter, path) < TOLERANCE  # all blocks: alpha / (r / block_size)
    for blocks in (1, 2):
        cut, _ = truncate_prefix(adapter, 2 * blocks)
        assert _worst_error(cut, path, f"out_blocks{blocks}") < TOLERANCE
    assert "out_blocks1." + kohya_module_names(path)[0] in ref


def test_lycoris_dylora_read_as_plain_kohya_is_another_scale():
    """What loramerge did before: the same tensors at alpha / r, a factor block_size off."""
    path = LYCORIS / "dylora.safetensors"
    plain = read_adapter(path, "kohya")
    assert _worst_error(plain, path) > 0.1


def test_lycoris_files_are_not_claimed_by_kohya():
    for name in PLAIN + DORA + ["dylora"]:
        assert detect(LYCORIS / f"{name}.safetensors").name == "lycoris", name


def _rewrite(source: Path, target: Path, metadata: dict[str, str], rename=None) -> Path:
    from safetensors.torch import load_file

    tensors = load_file(source)
    if rename:
        tensors = {rename(k): v for k, v in tensors.items()}
    save_tensors(target, tensors, metadata)
    return target


def test_without_metadata_loha_is_still_lycoris_and_locon_is_plain_kohya(tmp_path):
    loha = _rewrite(LYCORIS / "loha.safetensors", tmp_path / "loha.safetensors", {})
    assert detect(loha).name == "lycoris"
    locon = _rewrite(LYCORIS / "locon.safetensors", tmp_path / "locon.safetensors", {})
    assert detect(locon).name == "kohya"  # the same tensors mean the same update either way


def test_contradicting_metadata_is_refused_naming_both(tmp_path):
    from safetensors.torch import load_file

    # LoHa modules and one LoCon module, under kohya's own trainer name
    tensors = load_file(LYCORIS / "loha.safetensors")
    tensors["lora_unet_extra.lora_down.weight"] = torch.ones(1, 2)
    tensors["lora_unet_extra.lora_up.weight"] = torch.ones(2, 1)
    path = tmp_path / "x.safetensors"
    save_tensors(path, tensors, {"ss_network_module": "networks.lora"})
    with pytest.raises(UnknownFormatError, match="kohya and lycoris"):
        detect(path)


def test_methods_without_an_additive_update_are_refused_by_name(tmp_path):
    path = tmp_path / "oft.safetensors"
    save_tensors(path, {"lora_unet_conv_in.oft_blocks": torch.zeros(4, 2, 2)}, {})
    assert detect(path).name == "lycoris"
    with pytest.raises(FormatError, match="OFT"):
        read_adapter(path)


def test_dora_with_input_norms_is_refused(tmp_path):
    source = LYCORIS / "locon-dora.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(source)
    key = "lora_te_encoder_layers_0_mlp_fc1.dora_scale"
    tensors[key] = torch.ones(1, 32)  # wd_on_output=False: one value per input column
    path = tmp_path / "dora.safetensors"
    save_tensors(path, tensors, {"ss_network_module": "lycoris.kohya"})
    with pytest.raises(FormatError, match="wd_on_output"):
        read_adapter(path)


def test_dora_fold_changes_magnitudes_by_at_most_eps():
    adapter = read_adapter(LYCORIS / "locon-dora.safetensors")
    folded = lycoris.fold_dora_epsilon(adapter, _base_weight)
    assert not lycoris.needs_dora_fold(folded)
    for key, module in adapter.modules.items():
        before, after = module.magnitude.float(), folded.modules[key].magnitude.float()
        assert float(((before - after) / before).abs().max()) < 1e-5
    assert json.loads(adapter.metadata[lycoris.DORA_KEY])


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["full", "lokr-full", "loha-dora", "locon-tucker"])
def test_merging_into_the_unet_folder_equals_the_lycoris_forward(tmp_path, name):
    """Merge-only forms merge exactly: the merged UNet's layers give LyCORIS's outputs."""
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from sd_fixtures import SD_BASE, geometry, layer_inputs

    from loramerge.jobs.merge import merge_adapter

    path = LYCORIS / f"{name}.safetensors"
    out = tmp_path / "unet"
    merge_adapter(read_adapter(path), SD_BASE / "unet", out, dtype="float32")
    merged = load_file(out / "diffusion_pytorch_model.safetensors")
    ref = reference(path)
    checked = 0
    for kohya_name in kohya_module_names(path):
        component, module_path = kohya_index()[kohya_name]
        if component != "unet":
            continue
        geo = geometry()[f"unet.{module_path}"]
        x = layer_inputs()[f"in.unet.{module_path}"]
        weight, bias = merged[f"{module_path}.weight"], merged.get(f"{module_path}.bias")
        if geo["kind"] == "linear":
            got = F.linear(x, weight, bias)
        else:
            got = F.conv2d(x, weight, bias, stride=geo["stride"], padding=geo["padding"])
        assert relative_error(got.to(torch.float64), ref[f"out.{kohya_name}"]) < TOLERANCE
        checked += 1
    assert checked == 19


def test_truncating_a_merge_only_form_reports_its_error(tmp_path):
    """`truncate --rank` is the explicit way to a LoRA for forms with no low-rank one."""
    from loramerge.jobs.truncate import TruncateOptions, truncate_adapter

    out = tmp_path / "rank2.safetensors"
    result = truncate_adapter(LYCORIS / "lokr-full.safetensors", out, TruncateOptions(ranks=(2,)))
    assert result.output == "kohya"
    rows = result.outputs[0].modules
    assert {row.rank_after for row in rows} == {2}
    assert max(row.relative_error for row in rows) > 0.01  # the error it costs, reported
    again = read_adapter(out)
    assert again.source_format == "kohya" and {m.r for m in again.modules.values()} == {2}
    assert {m.component for m in again.modules.values()} == {"unet", "text_encoder"}


@pytest.mark.oracle
def test_truncated_lycoris_dylora_is_a_plain_lora_at_the_trained_scale(tmp_path):
    path = LYCORIS / "dylora.safetensors"
    out = tmp_path / "rank2.safetensors"
    from loramerge.jobs.truncate import TruncateOptions, truncate_adapter

    truncate_adapter(path, out, TruncateOptions(ranks=(2,)))
    written = read_adapter(out)
    assert written.source_format == "kohya"  # no longer claims to be DyLoRA
    assert _worst_error(written, path, "out_blocks1") < TOLERANCE
