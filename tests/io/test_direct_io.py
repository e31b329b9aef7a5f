"""Direct (O_DIRECT) reads and writes: any range, any chunking, the same bytes as buffered I/O;
file systems that refuse direct transfers get buffered ones."""

from __future__ import annotations

import errno
import os
import random

import pytest
import torch

from loramerge.io import direct_io
from loramerge.io.direct_append import BlockAppender
from loramerge.io.direct_io import BLOCK, DirectRangeReader
from loramerge.io.safetensors_writer import OutputTensor, StreamingWriter


@pytest.fixture
def direct_dir(tmp_path):
    if not direct_io.direct_writes_work(tmp_path):
        pytest.skip(f"{tmp_path} takes no O_DIRECT writes")
    return tmp_path


def _payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("capacity", [BLOCK, 3 * BLOCK, 1 << 20])
def test_appender_writes_every_chunking_byte_for_byte(direct_dir, capacity):
    payload = _payload(5 * BLOCK + 1234)
    path = direct_dir / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    assert direct_io.try_set_direct(fd)
    appender = BlockAppender(fd, capacity=capacity)
    rng, done = random.Random(1), 0
    while done < len(payload):
        step = rng.choice([1, 7, BLOCK - 1, BLOCK, BLOCK + 3, 2 * capacity])
        chunk = payload[done : done + step]
        if rng.random() < 0.5:
            appender.append(chunk)
        else:
            appender.append_tensor(torch.frombuffer(bytearray(chunk), dtype=torch.uint8))
        done += len(chunk)
    appender.finish()
    os.close(fd)
    assert path.read_bytes() == payload


def test_reader_returns_any_unaligned_range(direct_dir, monkeypatch):
    monkeypatch.setattr(direct_io, "MIN_DIRECT_BYTES", 0)
    monkeypatch.setattr(direct_io, "CACHED_SHARE", 2.0)  # direct even though the file is cached
    payload = _payload(7 * BLOCK + 99, seed=2)
    path = direct_dir / "in.bin"
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY)
    reader = DirectRangeReader(fd)
    assert reader.direct
    rng = random.Random(3)
    for _ in range(200):
        offset = rng.randrange(len(payload))
        length = rng.randrange(1, len(payload) - offset + 1)
        found = reader.read(offset, length)
        assert found is not None
        assert found.numpy().tobytes() == payload[offset : offset + length]
    assert reader.read(len(payload) - 10, 20) is None, "past the end: left to the plain read"
    reader.close()
    os.close(fd)


def test_cached_ranges_and_small_ranges_are_read_through_the_page_cache(direct_dir):
    payload = _payload(4 << 20, seed=4)
    path = direct_dir / "in.bin"
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY)
    os.pread(fd, 1 << 20, 0)
    if direct_io.cached_share(fd, 0, 1 << 20) is None:
        pytest.skip("this kernel has no cachestat")
    assert direct_io.cached_share(fd, 100, 1 << 20) > 0.99
    reader = DirectRangeReader(fd)
    assert reader.direct
    assert reader.read(0, 1 << 20) is None, "in the page cache: left to the ordinary read"
    os.fsync(fd)  # dirty pages cannot be dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert direct_io.cached_share(fd, 0, 1 << 20) < 0.01
    found = reader.read(5, 1 << 20)
    assert found is not None and found.numpy().tobytes() == payload[5 : 5 + (1 << 20)]
    assert reader.read(0, 100) is None  # small: not worth a direct transfer
    reader.close()
    os.close(fd)


def test_a_refused_direct_write_is_retried_buffered(direct_dir, monkeypatch):
    real_pwritev, refused = os.pwritev, []

    def pwritev(fd, buffers, offset):
        if os.get_blocking(fd) and direct_io.fcntl.fcntl(fd, direct_io.fcntl.F_GETFL) & (
            direct_io.O_DIRECT
        ):
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    payload = _payload(3 * BLOCK + 5, seed=5)
    layout = [OutputTensor("t", "U8", (len(payload),))]
    path = direct_dir / "out.safetensors"
    with StreamingWriter(path, layout, {}, direct=True) as writer:
        assert writer.direct
        writer.write_tensor(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    assert refused, "the direct write was attempted"
    assert path.read_bytes().endswith(payload)


def test_writer_without_direct_support_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "O_DIRECT", 0)
    assert not direct_io.direct_writes_work(tmp_path)
    path = tmp_path / "out.safetensors"
    with StreamingWriter(path, [OutputTensor("t", "U8", (3,))], {}, direct=True) as writer:
        assert not writer.direct
        writer.write(b"abc")
    assert path.read_bytes().endswith(b"abc")
