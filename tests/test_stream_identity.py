"""The pipelined, tiled merge writes exactly the bytes of the plain sequential one."""

from __future__ import annotations

import pytest
from helpers import ADAPTERS, BASES, MERGE_CASES, tree_hashes


def _stream(adapter_name, base_name, out, pipelined):
    from loramerge.atomic import atomic_output
    from loramerge.formats.registry import read_adapter
    from loramerge.merge import write_folder_files
    from loramerge.model.folder import open_base
    from loramerge.model.plan import plan_merge
    from loramerge.model.stream import stream_plan

    adapter = read_adapter(ADAPTERS / adapter_name)
    base = open_base(BASES / base_name)
    plan = plan_merge(base.tensors(), base.config, adapter)
    with atomic_output(out) as temp:
        stream_plan(plan, base, adapter, temp, pipelined=pipelined)
        write_folder_files(base, plan, temp)
    return tree_hashes(out)


@pytest.mark.parametrize(("adapter", "base"), MERGE_CASES, ids=[a for a, _ in MERGE_CASES])
def test_pipelined_equals_sequential(tmp_path, monkeypatch, adapter, base):
    from loramerge.model import stream

    sequential = _stream(adapter, base, tmp_path / "sequential", pipelined=False)
    pipelined = _stream(adapter, base, tmp_path / "pipelined", pipelined=True)
    assert pipelined == sequential
    # tiles of a few rows each: tiling must not change a single bit either
    monkeypatch.setattr(stream, "TILE_BYTES", 4 * 64 * 3)
    tiny_tiles = _stream(adapter, base, tmp_path / "tiny-tiles", pipelined=True)
    assert tiny_tiles == sequential


def test_merge_command_output_equals_sequential_path(cli, tmp_path):
    result = cli(
        "merge", ADAPTERS / "llama-lora", "--base", BASES / "llama", "-o", tmp_path / "cli", "-q"
    )
    assert result.exit_code == 0, result.output
    sequential = _stream("llama-lora", "llama", tmp_path / "sequential", pipelined=False)
    assert tree_hashes(tmp_path / "cli") == sequential
