"""The pipelined, tiled, direct-I/O merge writes exactly the bytes of the plain sequential one
(buffered I/O, kernel-side copies, one step at a time)."""

from __future__ import annotations

import pytest
from helpers import ADAPTERS, BASES, MERGE_CASES, tree_hashes


def _stream(adapter_name, base_name, out, pipelined, direct=True):
    from loramerge.formats.registry import read_adapter
    from loramerge.io.atomic import atomic_output
    from loramerge.jobs.merge import write_folder_files
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
    from loramerge.model import sources

    def one_block_appender(fd: int) -> BlockAppender:
        return BlockAppender(fd, capacity=direct_io.BLOCK)

    if not direct_io.direct_writes_work(tmp_path):
        pytest.skip(f"{tmp_path} takes no O_DIRECT writes: the fast path cannot be compared")
    sequential = _stream(adapter, base, tmp_path / "sequential", pipelined=False, direct=False)
    pipelined = _stream(adapter, base, tmp_path / "pipelined", pipelined=True)
    assert pipelined == sequential
    # tiles of a few rows each, direct reads of every range, a one-block staging buffer:
    # none of it may change a single bit
    monkeypatch.setattr(sources, "TILE_BYTES", 4 * 64 * 3)
    monkeypatch.setattr(sources, "MIN_TILE_ROWS", 1)
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
