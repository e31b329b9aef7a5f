"""The pipelined, tiled, direct-I/O merge writes exactly the bytes of the plain sequential one
(buffered I/O, kernel-side copies, one step at a time)."""

from __future__ import annotations

import pytest
from helpers import ADAPTERS, BASES, MERGE_CASES, tree_hashes


def _stream(adapter_name, base_name, out, pipelined, direct=True):
    from loramerge.formats.registry import read_adapter
    from loramerge.io.atomic import atomic_output
    from loramerge.jobs.merged_folder import write_folder_files
    from loramerge.model.folder import open_base
    from loramerge.model.planner import plan_merge
    from loramerge.model.stream import stream_plan

    adapter = read_adapter(ADAPTERS / adapter_name)
    base = open_base(BASES / base_name)
    plan = plan_merge(base, adapter)
    with atomic_output(out) as temp:
        stream_plan(plan, base, temp, pipelined=pipelined, direct=direct)
        write_folder_files(base, plan, temp)
    return tree_hashes(out)


@pytest.mark.parametrize(("adapter", "base"), MERGE_CASES, ids=[a for a, _ in MERGE_CASES])
def test_pipelined_equals_sequential(tmp_path, monkeypatch, adapter, base):
    from loramerge.io import direct_io, safetensors_writer
    from loramerge.io.direct_append import BlockAppender
    from loramerge.model import tiling

    def one_block_appender(fd: int) -> BlockAppender:
        return BlockAppender(fd, capacity=direct_io.BLOCK)

    if not direct_io.direct_writes_work(tmp_path):
        pytest.skip(f"{tmp_path} takes no O_DIRECT writes: the fast path cannot be compared")
    sequential = _stream(adapter, base, tmp_path / "sequential", pipelined=False, direct=False)
    pipelined = _stream(adapter, base, tmp_path / "pipelined", pipelined=True)
    assert pipelined == sequential
    # tiles of a few rows each, direct reads of every range, a one-block staging buffer:
    # none of it may change a single bit
    monkeypatch.setattr(tiling, "TILE_BYTES", 4 * 64 * 3)
    monkeypatch.setattr(tiling, "MIN_TILE_ROWS", 1)
    monkeypatch.setattr(direct_io, "MIN_DIRECT_BYTES", 0)
    monkeypatch.setattr(direct_io, "CACHED_SHARE", 2.0)
    monkeypatch.setattr(safetensors_writer, "BlockAppender", one_block_appender)
    tiny = _stream(adapter, base, tmp_path / "tiny-tiles", pipelined=True)
    assert tiny == sequential
    assert _stream(adapter, base, tmp_path / "buffered", pipelined=True, direct=False) == sequential


def test_merge_command_output_equals_sequential_path(cli, tmp_path):
    result = cli(
        "merge", ADAPTERS / "llama-lora", "--base", BASES / "llama", "-o", tmp_path / "cli", "-q"
    )
    assert result.exit_code == 0, result.output
    sequential = _stream("llama-lora", "llama", tmp_path / "sequential", pipelined=False)
    assert tree_hashes(tmp_path / "cli") == sequential


def _plan(adapter_path, base_path):
    from loramerge.formats.registry import read_adapter
    from loramerge.model.folder import open_base
    from loramerge.model.planner import plan_merge

    base = open_base(base_path)
    return plan_merge(base, read_adapter(adapter_path)), base


def _write(plan, base, out, engine):
    from loramerge.io.atomic import atomic_output
    from loramerge.jobs.merged_folder import write_folder_files

    with atomic_output(out) as temp:
        result = engine(plan, base, temp)
        write_folder_files(base, plan, temp)
    stats = [(n, s.tensor, s.elements, s.changed) for n, s in result.modules.items()]
    return tree_hashes(out), stats, result.bytes_written


def _engines_agree(adapter_path, base_path, tmp_path, monkeypatch, label=""):
    """The torch-free engine, as is and in its smallest pieces, writes the torch engine's
    sequential bytes and counts."""
    from loramerge.io import chunked_output, direct_io
    from loramerge.model import fast_stream, fast_support, tiling
    from loramerge.model.stream import stream_plan

    plan, base = _plan(adapter_path, base_path)
    assert fast_support.unsupported(plan, base) is None

    def sequential(plan, base, out):
        return stream_plan(plan, base, out, pipelined=False, direct=False)

    expected = _write(plan, base, tmp_path / f"{label}torch", sequential)
    assert _write(plan, base, tmp_path / f"{label}fast", fast_stream.stream_fast) == expected
    # tiles of a few rows (products formed over a wider span, never fused), pieces that
    # straddle one-block chunks, direct reads of every range: the same bytes
    monkeypatch.setattr(tiling, "TILE_BYTES", 4 * 64 * 3)
    monkeypatch.setattr(tiling, "MIN_TILE_ROWS", 1)
    monkeypatch.setattr(direct_io, "MIN_DIRECT_BYTES", 0)
    monkeypatch.setattr(direct_io, "CACHED_SHARE", 2.0)
    monkeypatch.setattr(chunked_output, "CHUNK", direct_io.BLOCK)
    monkeypatch.setattr(fast_stream, "COPY_PIECE", 1000)
    tiny = _write(plan, base, tmp_path / f"{label}tiny", fast_stream.stream_fast)
    assert tiny == expected
    monkeypatch.setattr(fast_stream, "direct_writes_work", lambda folder: False)
    assert _write(plan, base, tmp_path / f"{label}buffered", fast_stream.stream_fast) == expected
    monkeypatch.undo()


FAST_CASES = [(a, b) for a, b in MERGE_CASES if a in ("llama-lora", "llama-rslora-patterns")]


@pytest.mark.parametrize(("adapter", "base"), FAST_CASES, ids=[a for a, _ in FAST_CASES])
def test_torch_free_engine_writes_the_torch_engines_bytes(tmp_path, monkeypatch, adapter, base):
    _engines_agree(ADAPTERS / adapter, BASES / base, tmp_path, monkeypatch)


def _synthetic(folder, base_code, factor_code, rank, alpha, rslora=False, tiny=False):
    """A small Llama in `base_code` with an odd-sized byte tensor among its weights (later
    tensors start at odd offsets), and a LoRA on every projection."""
    import json

    import torch

    from loramerge.io.safetensors_header import torch_dtype
    from loramerge.io.safetensors_writer import save_tensors

    generator = torch.Generator().manual_seed(rank * 31 + int(alpha * 7))
    hidden, inner, vocab, kv = 128, 192, 160, 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}  # fmt: skip
    projections = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
                   "o_proj": (hidden, hidden), "gate_proj": (inner, hidden),
                   "up_proj": (inner, hidden), "down_proj": (hidden, inner)}  # fmt: skip
    for layer in range(2):
        for name, shape in projections.items():
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            shapes[f"model.layers.{layer}.{group}.{name}.weight"] = shape
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"model.layers.{layer}.{norm}.weight"] = (hidden,)
    tensors = {n: (torch.randn(s, generator=generator) * 0.05).to(torch_dtype(base_code))
               for n, s in shapes.items()}  # fmt: skip
    tensors["model.aaa_odd_bytes"] = torch.arange(3, dtype=torch.uint8)  # sorts before layers
    (folder / "base").mkdir(parents=True)
    save_tensors(folder / "base" / "model.safetensors", tensors, {"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": hidden, "intermediate_size": inner, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
              "tie_word_embeddings": False, "rms_norm_eps": 1e-5}  # fmt: skip
    (folder / "base" / "config.json").write_text(json.dumps(config))
    factors, size = {}, 1e-30 if tiny else 0.05
    for name, shape in shapes.items():
        if not name.endswith("proj.weight"):
            continue
        out_features, in_features = shape
        stem = "base_model.model." + name.removesuffix(".weight")
        for part, shape in (("lora_A", (rank, in_features)), ("lora_B", (out_features, rank))):
            value = torch.randn(shape, generator=generator) * size
            factors[f"{stem}.{part}.weight"] = value.to(torch_dtype(factor_code))
    (folder / "adapter").mkdir()
    save_tensors(folder / "adapter" / "adapter_model.safetensors", factors, {"format": "pt"})
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
                      "target_modules": list(projections), "task_type": "CAUSAL_LM"}  # fmt: skip
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder / "adapter", folder / "base"


@pytest.mark.parametrize(
    ("base_code", "factor_code", "rank", "alpha", "rslora", "tiny"),
    [
        ("BF16", "F32", 16, 32, False, False),  # scale 2: moved into A, fused products
        ("BF16", "BF16", 1, 1, False, False),  # rank 1, unit scale
        ("BF16", "F16", 7, 3, False, False),  # scale 3/7: products scaled, then added
        ("F32", "F32", 64, 8, True, False),  # rsLoRA, a float32 base
        ("BF16", "F32", 2, 4, False, True),  # tiny factors: the scale may not move into A
    ],
)
def test_torch_free_engine_on_ranks_scales_and_dtypes(
    tmp_path, monkeypatch, base_code, factor_code, rank, alpha, rslora, tiny
):
    adapter, base = _synthetic(tmp_path / "in", base_code, factor_code, rank, alpha, rslora, tiny)
    _engines_agree(adapter, base, tmp_path, monkeypatch)
