"""Engine profiles: each output obeys its engine's rules (docs/engines/) and, read the way that
engine reads it (its reading rule written here; PEFT's own loader where PEFT can read it; the
gguf package and llama.cpp's permutation for llama.cpp), gives PEFT's logits for the source
adapter. What an engine cannot serve is refused."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ADAPTERS, BASES, assert_usage_error, token_ids
from helpers import assert_one_error as _one_error
from oracles import (
    PLANTED,
    PeftOracle,
    assert_logits_match,
    base_logits,
    llama_cpp_gguf_deltas,
    logits_with_deltas,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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


# --- each engine's reading rule, written from its documentation (docs/engines/) -------------------
# Each returns the dense float64 update the engine adds to every base weight when it loads the
# folder: weight name -> scale * B @ A. PEFT itself is the oracle for what it reads.


def _factors(folder: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, module path -> (A, B) in float64) from `base_model.model.<path>.lora_A.weight`
    keys, the only spelling TGI and LoRAX look up (and what vLLM and SGLang read)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    factors = {}
    for key, lora_a in tensors.items():
        match = re.match(r"^base_model\.model\.(.+)\.lora_A\.weight$", key)
        if match:
            lora_b = tensors[f"{PREFIX}{match.group(1)}.lora_B.weight"]
            factors[match.group(1)] = (lora_a.double(), lora_b.double())
    return config, factors


def vllm_reading(folder: Path) -> dict[str, torch.Tensor]:
    """vLLM: one scale for the whole adapter from the config's r, lora_alpha and use_rslora;
    each module at its own rank (slots are padded to --max-lora-rank); patterns not read."""
    config, factors = _factors(folder)
    scale = _global_scale(config)
    return {f"{path}.weight": scale * (b @ a) for path, (a, b) in factors.items()}


def tgi_reading(folder: Path) -> dict[str, torch.Tensor]:
    """TGI and LoRAX: the same one scale, factors stacked per projection over all layers, so
    every module at the config's r; only the seven LLaMA projections."""
    config, factors = _factors(folder)
    scale = _global_scale(config)
    for path, (a, _) in factors.items():
        assert path.rsplit(".", 1)[-1] in TGI_MODULES and a.shape[0] == config["r"], path
    return {f"{path}.weight": scale * (b @ a) for path, (a, b) in factors.items()}


def sglang_reading(folder: Path) -> dict[str, torch.Tensor]:
    """SGLang: lora_alpha / r for every module (no rsLoRA, no patterns), one rank."""
    config, factors = _factors(folder)
    scale = config["lora_alpha"] / config["r"]
    for path, (a, _) in factors.items():
        assert a.shape[0] == config["r"], path
    return {f"{path}.weight": scale * (b @ a) for path, (a, b) in factors.items()}


READINGS = {
    "vllm": vllm_reading,
    "tgi": tgi_reading,
    "lorax": tgi_reading,
    "sglang": sglang_reading,
}
SOURCES = ["llama-rslora-patterns", "llama-lora"]
ENGINES = ["peft", "vllm", "tgi", "lorax", "sglang", "llama.cpp"]
LLAMA = BASES / "llama"
HEADS, KV_HEADS = 4, 2  # fixtures/bases/llama


@pytest.fixture(scope="module")
def source_logits():
    """source -> (ids, PEFT's logits, PEFT's logits with a planted scale error, base logits)."""
    found = {}

    def get(source: str):
        if source not in found:
            ids = token_ids(LLAMA)
            oracle = PeftOracle(ADAPTERS / source, LLAMA)
            base = base_logits(LLAMA, ids)
            found[source] = (ids, oracle.logits(ids), oracle.logits(ids, 1 + PLANTED), base)
        return found[source]

    return get


def _readings(engine: str, out: Path, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output as each of its readers sees it: PEFT for every folder, and the engine's own
    reading rule where it differs from PEFT's; llama.cpp through the gguf package."""
    if engine == "llama.cpp":
        deltas = llama_cpp_gguf_deltas(out, HEADS, KV_HEADS)
        return {"llama.cpp's rule": logits_with_deltas(LLAMA, deltas, ids)}
    readings = {"PEFT": PeftOracle(out, LLAMA).logits(ids)}
    if engine in READINGS:
        readings[f"{engine}'s rule"] = logits_with_deltas(LLAMA, READINGS[engine](out), ids)
    return readings


@pytest.mark.oracle
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("engine", ENGINES)
def test_profile_read_by_its_engine_gives_the_source_logits(
    cli, tmp_path, source_logits, engine, source
):
    """Each profile's output obeys its engine's rules, and read the way that engine reads it
    (and by PEFT where PEFT can) gives PEFT's logits for the source adapter."""
    out = tmp_path / ("adapter.gguf" if engine == "llama.cpp" else engine)
    args = ["convert", ADAPTERS / source, "--engine", engine, "-o", out, "--json"]
    if engine == "llama.cpp":
        args += ["--to", "gguf", "--base", LLAMA]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["engine"] == engine
    assert report["format"] == ("gguf" if engine == "llama.cpp" else "peft")
    if engine == "vllm":
        check_vllm(out, report["launch"])
        assert report["launch_args"] == [f"--max-lora-rank {report['launch']['max_lora_rank']}"]
    elif engine in ("tgi", "lorax"):
        check_tgi(out, layers=4)
    elif engine == "sglang":
        check_sglang(out)
    ids, expected, planted, base = source_logits(source)
    for reader, got in _readings(engine, out, ids).items():
        assert_logits_match(got, expected, planted, base, f"{engine} from {source}, {reader}")


@pytest.mark.parametrize("engine", ["peft", "vllm", "tgi", "lorax", "sglang"])
def test_verify_accepts_every_profile_self_consistency(cli, tmp_path, engine):
    """Self-consistency (loramerge's verify on loramerge's output), as the engine pages tell
    users to check; the oracle test above is what shows the outputs right."""
    out = tmp_path / engine
    source = ADAPTERS / "llama-rslora-patterns"
    assert cli("convert", source, "--engine", engine, "-o", out).exit_code == 0
    verified = cli("verify", source, out)
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.startswith("ok: ")


def test_vllm_prints_the_max_lora_rank(cli, tmp_path):
    out = tmp_path / "v"
    result = cli("convert", ADAPTERS / "llama-rslora-patterns", "--engine", "vllm", "-o", out)
    assert result.exit_code == 0, result.output
    assert "--max-lora-rank 16" in result.stdout  # largest rank 12 -> 16


@pytest.mark.oracle
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
    """A copy of a fixture adapter whose weights file lacks the modules `drop(path)` selects,
    written with the safetensors package (the config still targets them: PEFT, the oracle,
    then builds them with lora_B = 0, i.e. no update)."""
    folder = tmp_path / f"{source}-partial"
    shutil.copytree(ADAPTERS / source, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    kept = {}
    for key, value in tensors.items():
        path = key.removeprefix(PREFIX).rsplit(".lora_", 1)[0]
        if not drop(path):
            kept[key] = value
    assert len(kept) < len(tensors)
    save_file(kept, folder / "adapter_model.safetensors")
    return folder


def _assert_reads_like_peft(source: Path, out: Path, reading) -> None:
    ids = token_ids(LLAMA)
    oracle = PeftOracle(source, LLAMA)
    expected, planted = oracle.logits(ids), oracle.logits(ids, 1 + PLANTED)
    base = base_logits(LLAMA, ids)
    got = logits_with_deltas(LLAMA, reading(out), ids)
    assert_logits_match(got, expected, planted, base, f"{out.name} read by its engine's rule")


@pytest.mark.oracle
@pytest.mark.filterwarnings("ignore:Found missing adapter keys:UserWarning")
def test_tgi_fills_a_layer_gap_with_an_exact_zero_module(cli, tmp_path):
    source = _without(tmp_path, "llama-lora", lambda p: p == "model.layers.2.self_attn.q_proj")
    out = tmp_path / "tgi"
    assert cli("convert", source, "--engine", "tgi", "-o", out).exit_code == 0
    check_tgi(out, layers=4)
    with safe_open(out / "adapter_model.safetensors", "pt") as handle:
        added = handle.get_tensor(PREFIX + "model.layers.2.self_attn.q_proj.lora_B.weight")
    assert not added.any()
    _assert_reads_like_peft(source, out, tgi_reading)


@pytest.mark.oracle
@pytest.mark.filterwarnings("ignore:Found missing adapter keys:UserWarning")
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
    _assert_reads_like_peft(source, out, sglang_reading)


@pytest.mark.oracle
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


@pytest.mark.oracle
@pytest.mark.parametrize("command", ["truncate", "fold", "reslora"])
def test_other_writers_take_engine(cli, tmp_path, command):
    """`--engine` on every command that writes an adapter: the same profile, the same meaning.
    The plain output read by PEFT is the reference; the vLLM output read by vLLM's rule and by
    PEFT must give its logits."""
    from helpers import FIXTURES

    plain, engined = tmp_path / "plain", tmp_path / "engined"
    if command == "truncate":
        args = ["truncate", ADAPTERS / "llama-rslora-patterns", "--rank", "6"]
    elif command == "fold":
        args = ["fold", FIXTURES / "cola", "--as-lora"]
    else:
        args = ["reslora", FIXTURES / "reslora" / "bs", "--base", LLAMA]
    if not Path(args[1]).exists():
        pytest.skip(f"{args[1]} is not built")
    assert cli(*args, "-o", plain).exit_code == 0
    result = cli(*args, "-o", engined, "--engine", "vllm", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["engine"]
    check_vllm(engined, report["launch"])
    ids = token_ids(LLAMA)
    oracle = PeftOracle(plain, LLAMA)
    expected, planted = oracle.logits(ids), oracle.logits(ids, 1 + PLANTED)
    base = base_logits(LLAMA, ids)
    readings = {
        "vLLM's rule": logits_with_deltas(LLAMA, vllm_reading(engined), ids),
        "PEFT": PeftOracle(engined, LLAMA).logits(ids),
    }
    for reader, got in readings.items():
        assert_logits_match(got, expected, planted, base, f"{command} --engine vllm, {reader}")
