"""Engine profiles: each output obeys its engine's rules (formats.md) and means the same as its
source (by `verify`, and by PEFT's own loader); what an engine cannot serve is refused."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import ADAPTERS, BASES, assert_usage_error, peft_logits, token_ids
from helpers import assert_one_error as _one_error
from safetensors import safe_open

PREFIX = "base_model.model."
TGI_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_CHOICES = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks


def _written(folder: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(folder / "adapter_model.safetensors", "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    return config, shapes


def _lora_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """module path (no prefix) -> rank, from the lora_A tensors of a PEFT state dict."""
    found = {}
    for key, shape in shapes.items():
        match = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_(?:embedding_)?A(?:\.weight)?$", key)
        if match:
            found[match.group(1)] = shape[0]
    return found


def _peft_scale(config: dict, path: str, rank: int) -> float:
    """PEFT's scale for one module, patterns resolved the way PEFT documents them."""
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _global_scale(config: dict) -> float:
    """The one scale an engine that ignores the patterns computes from r and lora_alpha."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# --- one checker per engine, written from the table in formats.md --------------------------------


def check_vllm(folder: Path, launch: dict) -> None:
    config, shapes = _written(folder)
    assert not config.get("use_dora") and not config.get("lora_bias")
    assert not any("lora_magnitude_vector" in k or k.endswith("lora_B.bias") for k in shapes)
    saved = config.get("modules_to_save") or []
    assert set(saved) <= {"classifier", "score"}
    ranks = _lora_modules(shapes)
    assert max(ranks.values()) <= launch["max_lora_rank"]
    assert launch["max_lora_rank"] == min(c for c in VLLM_CHOICES if c >= max(ranks.values()))
    for path, rank in ranks.items():  # one scale from r and lora_alpha is right everywhere
        assert math.isclose(_peft_scale(config, path, rank), _global_scale(config), rel_tol=1e-9)


def check_tgi(folder: Path, layers: int) -> None:
    config, shapes = _written(folder)
    assert all(key.startswith(PREFIX) for key in shapes)
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    assert not config.get("use_dora") and not config.get("lora_bias")
    assert not config.get("modules_to_save")
    ranks = _lora_modules(shapes)
    assert set(ranks.values()) == {config["r"]}
    names = {path.rsplit(".", 1)[-1] for path in ranks}
    assert names <= TGI_MODULES
    for name in names:  # a projection missing in one layer is dropped for all layers
        templates = {re.sub(r"\.\d+\.", ".{}.", p) for p in ranks if p.endswith("." + name)}
        for template in templates:
            assert all(template.format(i) in ranks for i in range(layers)), template


def check_sglang(folder: Path) -> None:
    config, shapes = _written(folder)
    assert not config.get("use_rslora")
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    assert not config.get("use_dora") and not config.get("lora_bias")
    ranks = _lora_modules(shapes)
    assert set(ranks.values()) == {config["r"]}
    for path in ranks:  # lora_alpha / r is every module's scale
        assert math.isclose(_peft_scale(config, path, config["r"]), _global_scale(config))
    for path in ranks:  # q/k/v and gate/up are stacked per layer: whole groups
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            name = path.rsplit(".", 1)[-1]
            if name in group:
                stem = path[: -len(name)]
                assert all(stem + member in ranks for member in group), path


SOURCES = ["llama-rslora-patterns", "llama-lora"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("engine", ["peft", "vllm", "tgi", "lorax", "sglang"])
def test_profile_obeys_its_engine_and_means_the_same(cli, tmp_path, engine, source):
    out = tmp_path / engine
    result = cli("convert", ADAPTERS / source, "--engine", engine, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["engine"] == engine and report["format"] == "peft"
    if engine == "vllm":
        check_vllm(out, report["launch"])
        assert report["launch_args"] == [f"--max-lora-rank {report['launch']['max_lora_rank']}"]
    elif engine in ("tgi", "lorax"):
        check_tgi(out, layers=4)
    elif engine == "sglang":
        check_sglang(out)
    verified = cli("verify", ADAPTERS / source, out)
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.startswith("ok: ")


def test_profiles_load_in_peft_with_the_source_logits(cli, tmp_path):
    base = BASES / "llama"
    ids = token_ids(base)
    source = ADAPTERS / "llama-rslora-patterns"
    expected = peft_logits(source, base, ids)
    for engine in ("peft", "vllm", "tgi", "sglang"):
        out = tmp_path / engine
        assert cli("convert", source, "--engine", engine, "-o", out).exit_code == 0
        got = peft_logits(out, base, ids)
        assert (got - expected).abs().max().item() <= 1e-5, engine


def test_vllm_prints_the_max_lora_rank(cli, tmp_path):
    out = tmp_path / "v"
    result = cli("convert", ADAPTERS / "llama-rslora-patterns", "--engine", "vllm", "-o", out)
    assert result.exit_code == 0, result.output
    assert "--max-lora-rank 16" in result.stdout  # largest rank 12 -> 16


def test_uniform_adapter_keeps_its_tensors_byte_for_byte(cli, tmp_path):
    for engine in ("vllm", "tgi", "sglang"):
        out = tmp_path / engine
        assert cli("convert", ADAPTERS / "llama-lora", "--engine", engine, "-o", out).exit_code == 0
        with (
            safe_open(ADAPTERS / "llama-lora" / "adapter_model.safetensors", "pt") as a,
            safe_open(out / "adapter_model.safetensors", "pt") as b,
        ):
            assert set(a.keys()) == set(b.keys())
            for key in a.keys():  # noqa: SIM118
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), (engine, key)


@pytest.mark.parametrize(
    ("engine", "adapter", "needles"),
    [
        ("vllm", "llama-dora", ["vLLM", "DoRA"]),
        ("vllm", "gpt2-lora", ["vLLM", "lora_bias"]),
        ("vllm", "llama-modules-to-save", ["vLLM", "modules_to_save", "lm_head"]),
        ("tgi", "llama-tied-embedding", ["TGI", "embed_tokens"]),
        ("lorax", "llama-modules-to-save", ["LoRAX", "modules_to_save"]),
        ("sglang", "llama-dora", ["SGLang", "DoRA"]),
    ],
)
def test_profiles_refuse_what_their_engine_cannot_serve(cli, tmp_path, engine, adapter, needles):
    out = tmp_path / "out"
    result = cli("convert", ADAPTERS / adapter, "--engine", engine, "-o", out)
    _one_error(result, *needles)
    assert not out.exists()


def test_engine_and_format_must_agree(cli, tmp_path):
    out = tmp_path / "out"
    assert_usage_error(
        cli("convert", ADAPTERS / "llama-lora", "--engine", "vllm", "--to", "kohya", "-o", out),
        "'--engine vllm'",
        "peft",
    )
    result = cli("convert", ADAPTERS / "llama-lora", "--engine", "nope", "-o", out)
    assert_usage_error(result, "'--engine nope'", "not an engine")
    assert_usage_error(cli("convert", ADAPTERS / "llama-lora", "-o", out), "'--to'", "--engine")
    assert not out.exists()


def _without(tmp_path: Path, source: str, drop) -> Path:
    from loramerge.formats.peft import read, write

    adapter = read(ADAPTERS / source)
    adapter.modules = {p: m for p, m in adapter.modules.items() if not drop(p)}
    folder = tmp_path / f"{source}-partial"
    folder.mkdir()
    write(adapter, folder)
    return folder


def test_tgi_fills_a_layer_gap_with_an_exact_zero_module(cli, tmp_path):
    source = _without(tmp_path, "llama-lora", lambda p: p == "model.layers.2.self_attn.q_proj")
    out = tmp_path / "tgi"
    assert cli("convert", source, "--engine", "tgi", "-o", out).exit_code == 0
    check_tgi(out, layers=4)
    with safe_open(out / "adapter_model.safetensors", "pt") as handle:
        added = handle.get_tensor(PREFIX + "model.layers.2.self_attn.q_proj.lora_B.weight")
    assert not added.any()
    assert cli("verify", source, out).exit_code == 0


def test_sglang_completes_stacked_groups_from_the_base_config(cli, tmp_path):
    source = _without(tmp_path, "llama-lora", lambda p: p.endswith("k_proj"))
    out = tmp_path / "sg"
    # no k_proj anywhere: its shape comes only from the base config
    _one_error(cli("convert", source, "--engine", "sglang", "-o", out), "k_proj", "--base")
    result = cli("convert", source, "--engine", "sglang", "-o", out, "--base", BASES / "llama")
    assert result.exit_code == 0, result.output
    check_sglang(out)
    _, shapes = _written(out)
    assert shapes[PREFIX + "model.layers.0.self_attn.k_proj.lora_B.weight"] == (32, 8)  # 2 kv x 16
    assert cli("verify", source, out).exit_code == 0


def test_vllm_rank_choices_and_limit():
    from loramerge.adapter import Adapter, LazyTensor, LoraModule
    from loramerge.engines.profiles import apply_engine, vllm_max_lora_rank
    from loramerge.errors import OptionError

    expected = {1: 1, 2: 8, 8: 8, 9: 16, 64: 64, 300: 320, 321: 512, 512: 512, 513: None}
    assert {r: vllm_max_lora_rank(r) for r in expected} == expected
    big = LoraModule(
        "model.layers.0.self_attn.q_proj",
        LazyTensor.of(torch.zeros(513, 4)),
        LazyTensor.of(torch.zeros(4, 513)),
        alpha=513.0,
    )
    with pytest.raises(OptionError, match="512"):
        apply_engine(Adapter(modules={big.path: big}), "vllm", "peft")


def test_engine_help_lists_every_profile(cli):
    from loramerge.engines.profiles import ENGINES

    help_text = " ".join(cli("convert", "--help").output.split())
    choices = "--engine [" + "|".join(entry.name for entry in ENGINES) + "]"
    assert choices in help_text


@pytest.mark.parametrize("command", ["truncate", "fold", "reslora"])
def test_other_writers_take_engine(cli, tmp_path, command):
    """`--engine` on every command that writes an adapter: the same profile, the same meaning."""
    from helpers import FIXTURES

    base = BASES / "llama"
    plain, engined = tmp_path / "plain", tmp_path / "engined"
    if command == "truncate":
        args = ["truncate", ADAPTERS / "llama-rslora-patterns", "--rank", "6"]
    elif command == "fold":
        args = ["fold", FIXTURES / "cola", "--as-lora"]
    else:
        args = ["reslora", FIXTURES / "reslora" / "bs", "--base", base]
    if not Path(args[1]).exists():
        pytest.skip(f"{args[1]} is not built")
    assert cli(*args, "-o", plain).exit_code == 0
    result = cli(*args, "-o", engined, "--engine", "vllm", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["engine"]
    check_vllm(engined, report["launch"])
    assert cli("verify", plain, engined).exit_code == 0
