"""The validating header reader and the streaming writer, against the safetensors package."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loramerge.errors import LoramergeError
from loramerge.io.safetensors_header import parse_header, read_header
from loramerge.io.safetensors_reader import SafetensorsReader
from loramerge.io.safetensors_writer import save_tensors


def _raw_file(path, header: dict, data: bytes = b"", pad: bool = True):
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(4, 2).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt"}
    with SafetensorsReader(tmp_path / "x.safetensors") as reader:
        for name, value in tensors.items():
            assert torch.equal(reader.read(name), value)
        assert torch.equal(reader.read("a", (1, 3)), tensors["a"][1:3])


def test_writer_output_loads_with_safetensors(tmp_path):
    tensors = {"z": torch.randn(7, 3), "y": torch.randn(2).half(), "s": torch.tensor(1.0)}
    save_tensors(tmp_path / "w.safetensors", tensors, {"format": "pt"})
    loaded = load_file(tmp_path / "w.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value)
    raw = (tmp_path / "w.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "trailing"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        (
            {"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "needs 12 bytes",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps",
        ),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    ],
)
def test_rejects_bad_headers(tmp_path, header, data, message):
    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(LoramergeError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_rejects_oversized_and_short_headers(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    with pytest.raises(LoramergeError, match="100 MB"):
        read_header(huge)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(LoramergeError, match="too short"):
        read_header(short)
    claims = tmp_path / "claims.safetensors"
    claims.write_bytes(struct.pack("<Q", 64) + b"{}")
    with pytest.raises(LoramergeError, match="claims 64 bytes"):
        read_header(claims)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "I8", "F64", "X", 3]),
        "shape": st.lists(st.integers(-2, 6), max_size=3) | _json_values,
        "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | _json_values,
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.dictionaries(st.text(max_size=5), _entries | _json_values, max_size=4),
    data_len=st.integers(0, 96),
)
def test_fuzzed_headers_only_raise_loramerge_errors(header, data_len):
    raw = json.dumps(header).encode()
    try:
        parsed = parse_header(
            __import__("pathlib").Path("fuzz.safetensors"), raw, 8 + len(raw) + data_len
        )
    except LoramergeError:
        return
    # anything accepted must describe exactly the bytes that are there, no reads outside
    end = max((e.end for e in parsed.entries.values()), default=0)
    assert parsed.data_start + end == 8 + len(raw) + data_len
    for entry in parsed.entries.values():
        assert 0 <= entry.begin <= entry.end <= end


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64), data_len=st.integers(0, 64))
def test_fuzzed_bytes_only_raise_loramerge_errors(raw, data_len):
    with contextlib.suppress(LoramergeError):
        parse_header(__import__("pathlib").Path("fuzz.safetensors"), raw, 8 + len(raw) + data_len)
