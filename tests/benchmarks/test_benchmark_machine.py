"""The benchmark's cold state is cold only if eviction reaches what a merge reads: the model's
files and every file of the Python installation that runs it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

import loramerge
from loramerge.io.direct_io import cached_share

sys.path.insert(0, str(ROOT / "benchmarks"))
machine = pytest.importorskip("machine")


def _file_system_type(path: Path) -> str:
    """The type of the mount holding `path` (the longest mount point that contains it)."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        point = fields[1]
        if (path.as_posix() + "/").startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def test_evict_drops_a_read_file_from_the_page_cache(tmp_path):
    if not Path("/proc/mounts").exists() or _file_system_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("files in memory-backed file systems cannot be evicted")
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "shard.bin"
    path.write_bytes(os.urandom(8 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # written pages stay until written back
        while os.read(fd, 1 << 20):
            pass
        before = cached_share(fd)
        if before is None:
            pytest.skip("this kernel cannot say what is cached (no cachestat)")
        assert before > 0.9
        assert machine.evict([folder]) == 1
        assert cached_share(fd) == 0.0
    finally:
        os.close(fd)


def test_python_files_cover_what_a_merge_imports_but_not_a_system_prefix():
    roots = machine.python_files()
    wanted = [Path(loramerge.__file__).resolve(), Path(os.__file__).resolve()]
    for name in ("torch", "safetensors"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin
        wanted.append(Path(spec.origin).resolve())
    for path in wanted:
        assert any(root == path or root in path.parents for root in roots), path
    assert not {Path("/"), Path("/usr"), Path("/usr/local")} & set(roots)
    # nested folders would be evicted twice
    assert not any(a != b and a in b.parents for a in roots for b in roots)


def test_benchmark_process_never_maps_torch():
    """Pages a running process maps cannot be evicted: if the benchmark itself imported torch,
    every job's `import torch` would find torch's libraries cached."""
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import merge; "
        "sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(ROOT / "benchmarks")], check=False)
    assert done.returncode == 0
