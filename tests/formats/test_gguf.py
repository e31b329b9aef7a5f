"""llama.cpp LoRA GGUF: read back with the gguf package's own reader, keys and tensors as
llama.cpp expects them, and the source's factors after undoing the q/k permutation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import pytest
import torch
from helpers import ADAPTERS, BASES, assert_usage_error
from oracles import GGUF_LLAMA_NAMES, llama_cpp_permute
from safetensors import safe_open

GGUF_NAMES = {hf: gguf_name for gguf_name, hf in GGUF_LLAMA_NAMES.items()}
HEADS, KV_HEADS = 4, 2  # fixtures/bases/llama


def _source(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = ADAPTERS / name
    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(folder / "adapter_model.safetensors", "pt") as handle:
        tensors = {k.removeprefix("base_model.model."): handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return config, tensors


def _scale(config: dict, path: str, rank: int) -> float:
    import re

    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _gguf(cli, tmp_path: Path, adapter: str, base: Path = BASES / "llama") -> Path:
    out = tmp_path / f"{adapter}.gguf"
    result = cli("convert", ADAPTERS / adapter, "--to", "gguf", "--base", base, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def _expected_tensors(name: str, fold: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """gguf tensor stem -> (lora_a, lora_b) as llama.cpp's converter would write them."""
    config, tensors = _source(name)
    expected = {}
    for key, lora_a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removesuffix(".lora_A.weight")
        lora_b = tensors[path + ".lora_B.weight"]
        if fold:
            lora_b = lora_b.double() * _scale(config, path, lora_a.shape[0])
        layer = path.split(".")[2]
        suffix = ".".join(path.split(".")[3:])
        if suffix == "self_attn.q_proj":
            lora_b = llama_cpp_permute(lora_b, HEADS)
        elif suffix == "self_attn.k_proj":
            lora_b = llama_cpp_permute(lora_b, KV_HEADS)
        expected[f"blk.{layer}.{GGUF_NAMES[suffix]}.weight"] = (lora_a, lora_b.float())
    return expected


@pytest.mark.oracle
def test_uniform_scales_write_alpha_and_the_converter_layout(cli, tmp_path):
    out = _gguf(cli, tmp_path, "llama-lora")
    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == 16.0
    expected = _expected_tensors("llama-lora", fold=False)
    found = {t.name: t for t in reader.tensors}
    assert set(found) == {f"{s}.lora_{p}" for s in expected for p in "ab"}
    for stem, (lora_a, lora_b) in expected.items():
        a, b = found[stem + ".lora_a"], found[stem + ".lora_b"]
        # GGUF lists dimensions fastest first: ne = [in, r] for lora_a, [r, out] for lora_b
        assert [int(n) for n in a.shape] == [lora_a.shape[1], lora_a.shape[0]]
        assert [int(n) for n in b.shape] == [lora_b.shape[1], lora_b.shape[0]]
        assert torch.equal(torch.from_numpy(a.data.copy()), lora_a), stem
        assert torch.equal(torch.from_numpy(b.data.copy()), lora_b), stem


@pytest.mark.oracle
def test_mixed_scales_are_folded_into_lora_b_without_alpha(cli, tmp_path):
    out = _gguf(cli, tmp_path, "llama-rslora-patterns")
    reader = gguf.GGUFReader(out)
    assert "adapter.lora.alpha" not in reader.fields
    found = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    for stem, (lora_a, lora_b) in _expected_tensors("llama-rslora-patterns", fold=True).items():
        assert torch.equal(found[stem + ".lora_a"], lora_a), stem
        torch.testing.assert_close(found[stem + ".lora_b"], lora_b, rtol=1e-6, atol=1e-7)
    result = cli("verify", ADAPTERS / "llama-rslora-patterns", out)
    assert result.exit_code == 0, result.output


def test_llama_cpp_permutation_oracle_on_a_known_answer():
    """The oracle itself: one head of 8 rows is two rotary halves 0-3 and 4-7, interleaved;
    with two heads each head's rows are interleaved within the head."""
    assert llama_cpp_permute(torch.arange(8), 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert llama_cpp_permute(torch.arange(8), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.oracle
def test_permute_rows_is_llama_cpps_permutation():
    from loramerge.formats.gguf_arch import permute_rows, unpermute_rows

    torch.manual_seed(0)
    for heads, rows in ((1, 8), (2, 8), (2, 32), (4, 32), (8, 64), (32, 4096 // 16)):
        lora_b = torch.randn(rows, 3, dtype=torch.float64)
        assert torch.equal(permute_rows(lora_b, heads), llama_cpp_permute(lora_b, heads))
        assert torch.equal(unpermute_rows(llama_cpp_permute(lora_b, heads), heads), lora_b)


def test_reader_undoes_the_permutation_self_consistency(cli, tmp_path):
    """Self-consistency (loramerge reads back what loramerge wrote). The oracle tests of the
    same behaviour: the writer above (gguf package + llama.cpp's permutation) and the reader
    on a file written here without loramerge (test_foreign_gguf_...)."""
    from loramerge.formats.gguf import read

    adapter = read(_gguf(cli, tmp_path, "llama-lora"))
    config, tensors = _source("llama-lora")
    assert set(adapter.modules) == {
        k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")
    }
    for path, module in adapter.modules.items():
        assert torch.equal(module.lora_A.load(), tensors[path + ".lora_A.weight"])
        assert torch.equal(module.lora_B.load(), tensors[path + ".lora_B.weight"])
        assert module.scale == config["lora_alpha"] / config["r"]


def _config_only_base(tmp_path: Path, architecture: str, model_type: str) -> Path:
    folder = tmp_path / model_type
    folder.mkdir()
    config = json.loads((BASES / "llama" / "config.json").read_text())
    config.update(architectures=[architecture], model_type=model_type)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("architecture", "model_type", "arch", "permuted"),
    [
        ("MistralForCausalLM", "mistral", "llama", True),  # llama.cpp converts Mistral as llama
        ("Qwen2ForCausalLM", "qwen2", "qwen2", False),  # Qwen2Model keeps q/k rows as they are
    ],
)
def test_llama_family_architectures(tmp_path, architecture, model_type, arch, permuted):
    from loramerge.formats.registry import read_adapter
    from loramerge.jobs.adapter_output import choose_output, write_adapter

    base = _config_only_base(tmp_path, architecture, model_type)
    out = tmp_path / "out.gguf"
    write_adapter(read_adapter(ADAPTERS / "llama-lora"), out, choose_output("gguf", None, base))
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == arch
    found = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    _, tensors = _source("llama-lora")
    lora_b = tensors["model.layers.0.self_attn.q_proj.lora_B.weight"]
    expected = llama_cpp_permute(lora_b, HEADS) if permuted else lora_b
    assert torch.equal(found["blk.0.attn_q.weight.lora_b"], expected)


@pytest.mark.oracle
def test_embedding_lora_transposes_lora_a_for_token_embd(cli, tmp_path):
    out = _gguf(cli, tmp_path, "llama-tied-embedding", BASES / "llama-tied")
    found = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(out).tensors}
    _, tensors = _source("llama-tied-embedding")
    # llama.cpp gathers rows of lora_a by token id: it holds A^T (vocab x r)
    assert torch.equal(
        found["token_embd.weight.lora_a"], tensors["model.embed_tokens.lora_embedding_A"].T
    )
    assert torch.equal(
        found["token_embd.weight.lora_b"], tensors["model.embed_tokens.lora_embedding_B"]
    )
    result = cli("verify", ADAPTERS / "llama-tied-embedding", out)
    assert result.exit_code == 0, result.output


def test_gguf_needs_a_supported_base(cli, tmp_path):
    out = tmp_path / "x.gguf"
    result = cli("convert", ADAPTERS / "llama-lora", "--to", "gguf", "-o", out)
    assert_usage_error(result, "'--to gguf'", "needs --base")
    assert not out.exists()
    result = cli(
        "convert", ADAPTERS / "gpt2-lora", "--to", "gguf", "--base", BASES / "gpt2", "-o", out
    )
    assert result.exit_code == 1 and result.output.startswith("error: ") and not out.exists()
    result = cli(
        "convert", ADAPTERS / "llama-dora", "--to", "gguf", "--base", BASES / "llama", "-o", out
    )
    assert result.exit_code == 1 and "DoRA" in result.output and not out.exists()


@pytest.mark.oracle
def test_foreign_gguf_without_our_metadata_needs_the_base(tmp_path):
    """A file as llama.cpp's own converter writes it, made here with the gguf package from the
    PEFT fixture and llama.cpp's permutation (no loramerge keys): names come from gguf's map,
    and the permutation can only be undone with the base's head counts."""
    from loramerge.errors import FormatError
    from loramerge.formats.gguf import read
    from loramerge.formats.registry import ReadOptions

    config, tensors = _source("llama-lora")
    foreign = tmp_path / "foreign.gguf"
    writer = gguf.GGUFWriter(foreign, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for stem, (lora_a, lora_b) in _expected_tensors("llama-lora", fold=False).items():
        writer.add_tensor(stem + ".lora_a", lora_a.numpy())
        writer.add_tensor(stem + ".lora_b", lora_b.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FormatError, match="permuted"):
        read(foreign)
    base_config = json.loads((BASES / "llama" / "config.json").read_text())
    adapter = read(foreign, ReadOptions(base_config=base_config))
    assert len(adapter.modules) == 28
    for path, module in adapter.modules.items():
        assert torch.equal(module.lora_A.load(), tensors[path + ".lora_A.weight"]), path
        assert torch.equal(module.lora_B.load(), tensors[path + ".lora_B.weight"]), path
        assert module.scale == config["lora_alpha"] / config["r"]


def test_writing_streams_module_by_module(tmp_path):
    """Tensor infos first, then each module loaded, written and released: nothing of the source
    adapter stays cached in memory after the write."""
    from loramerge.formats import gguf_writer as gguf_format
    from loramerge.formats.peft import read

    adapter = read(ADAPTERS / "llama-lora")  # lazy: nothing loaded yet
    config = json.loads((BASES / "llama" / "config.json").read_text())
    out = tmp_path / "streamed.gguf"
    gguf_format.write(adapter, out, config)
    assert len(gguf.GGUFReader(out).tensors) == 2 * len(adapter.modules)
    for module in adapter.modules.values():
        assert module.lora_A._value is None and module.lora_B._value is None, module.path
