"""The benchmark's direct-I/O copy is a floor only if it copies: byte for byte, any file size."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT

from loramerge.io.direct_io import direct_writes_work

SIZES = {
    "config.json": 300,  # under one block: copied plainly
    "one-block.bin": 4096,
    "ragged.bin": (16 << 20) * 2 + 4096 * 3 + 17,  # two whole chunks, then a partial block
    "exact-chunk.bin": 16 << 20,
}


def test_direct_copy_copies_every_file_exactly(tmp_path):
    if not direct_writes_work(tmp_path):
        pytest.skip("this file system takes no O_DIRECT writes")
    source = tmp_path / "base"
    source.mkdir()
    for name, size in SIZES.items():
        (source / name).write_bytes(os.urandom(size))
    target = tmp_path / "copy"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "direct_copy.py"), str(source), str(target)],
        check=True,
        timeout=120,
    )
    assert sorted(p.name for p in target.iterdir()) == sorted(SIZES)
    for name in SIZES:
        assert (target / name).read_bytes() == (source / name).read_bytes(), name
