"""The validating header reader and the streaming writer, against the safetensors package."""

from __future__ import annotations

import json
import math
import struct
from collections import Counter

import pytest
import torch
from helpers import ADAPTERS, BASES, FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loramerge.errors import LoramergeError
from loramerge.io.safetensors_header import read_header, torch_dtype
from loramerge.io.safetensors_reader import SafetensorsReader
from loramerge.io.safetensors_writer import save_tensors


def _raw_file(path, header: dict, data: bytes = b"", pad: bool = True):
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.oracle
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


@pytest.mark.oracle
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


@pytest.mark.oracle
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


@pytest.mark.oracle
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


# --- fuzzing: valid-looking files with real tensor entries, and real files mutated ----------------
#
# Each fuzz test counts what it reached and asserts those counts itself (run alone, with -k or in
# parallel, the check is still there). Only loramerge's own errors may escape the reader.

# The safetensors format, written from its specification, as the oracle of what is valid: a JSON
# object of entries {dtype, shape, data_offsets} (plus optional string-to-string __metadata__),
# each entry's byte size prod(shape) x itemsize, the entries tiling the data section exactly.
# loramerge reads the dtypes below (not U16/U32/U64) and bounds dims by 2^53, offsets by 2^63.
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
NOT_READ = ["U16", "U32", "U64", "F4", "f32", "", 3, None, ["F32"]]


def _is_count(value, bound: int) -> bool:
    return type(value) is int and 0 <= value < bound


def spec_verdict(header: object, data_len: int) -> bool:
    """Whether a header (parsed JSON) and a data section of `data_len` bytes form a valid file."""
    if not isinstance(header, dict):
        return False
    header = dict(header)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        return False
    spans = []
    for entry in header.values():
        if not isinstance(entry, dict) or entry.get("dtype") not in ITEMSIZE:
            return False
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(d, 2**53) for d in shape):
            return False
        if not isinstance(offsets, list) or len(offsets) != 2:
            return False
        if not all(_is_count(o, 2**63) for o in offsets) or offsets[0] > offsets[1]:
            return False
        if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[entry["dtype"]]:
            return False
        spans.append(tuple(offsets))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            return False
        position = end
    return position == data_len


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _read_everything(path, counts) -> dict[str, bytes] | None:
    """Every tensor (and a slice of rows of each) through loramerge's reader; None if the file
    was refused (with a LoramergeError: any other exception escapes and fails the test)."""
    try:
        reader = SafetensorsReader(path)
    except LoramergeError:
        counts["refused"] += 1
        return None
    found = {}
    with reader:
        for name, entry in reader.header.entries.items():
            value = reader.read(name)
            assert tuple(value.shape) == entry.shape and value.dtype == torch_dtype(entry.dtype)
            found[name] = _raw(value)
            if entry.shape and entry.shape[0] > 1:
                rows = reader.read(name, (1, entry.shape[0]))
                assert _raw(rows) == found[name][entry.row_bytes :]
                counts["slices read"] += 1
            counts["tensors read"] += 1
    counts["accepted"] += 1
    return found


def _safetensors_reads(path) -> dict[str, bytes] | None:
    """The reference implementation's reading, or None where it refuses the file."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as handle:
            return {name: _raw(handle.get_tensor(name)) for name in handle.keys()}  # noqa: SIM118
    except Exception:  # the reference reader's own refusals, whatever their type
        return None


@st.composite
def headers_with_tensors(draw) -> tuple[dict, bytes, str]:
    """A valid file's header and data, then at most one subtle change (the returned label)."""
    names = draw(
        st.lists(
            st.text(min_size=1, max_size=5).filter(lambda n: n != "__metadata__"),
            min_size=1,
            max_size=5,
            unique=True,
        )
    )
    entries: dict[str, dict] = {}
    position = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = math.prod(shape) * ITEMSIZE[dtype]
        offsets = [position, position + size]
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        position += size
    data = draw(st.binary(min_size=position, max_size=position))
    change = draw(
        st.sampled_from(
            [
                "none", "dtype", "unknown dtype", "dim", "extra dim", "dim type", "offset",
                "offset type", "swap offsets", "gap", "data length", "missing field",
                "not an object", "metadata", "bad metadata",
            ]
        )
    )  # fmt: skip
    entry = entries[draw(st.sampled_from(names))]
    if change == "dtype":  # any other known dtype: same size or not
        entry["dtype"] = draw(st.sampled_from(sorted(ITEMSIZE)))
    elif change == "unknown dtype":
        entry["dtype"] = draw(st.sampled_from(NOT_READ))
    elif change == "dim":
        shape = entry["shape"] = list(entry["shape"]) or [1]
        axis = draw(st.integers(0, len(shape) - 1))
        shape[axis] = max(0, shape[axis] + draw(st.sampled_from([-1, 1, 2])))
    elif change == "extra dim":
        entry["shape"] = [*entry["shape"], draw(st.sampled_from([0, 1, 2]))]
    elif change == "dim type":
        odd = draw(st.sampled_from([-1, 1.0, True, "2", 2**53, 2**64]))
        entry["shape"] = [*entry["shape"], odd]
    elif change == "offset":
        entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.sampled_from([-8, -1, 1, 4]))
    elif change == "offset type":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = draw(
            st.sampled_from(
                [[begin], [begin, end, end], [str(begin), end], [begin, end + 0.0], None]
            )
        )
    elif change == "swap offsets" and len(names) > 1:
        other = entries[draw(st.sampled_from([n for n in names if entries[n] is not entry]))]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif change == "gap":  # k stray bytes before this tensor; later offsets shifted past them
        k = draw(st.integers(1, 8))
        begin = entry["data_offsets"][0]
        data = data[:begin] + bytes(k) + data[begin:]
        for other in entries.values():
            if other["data_offsets"][0] >= begin and other is not entry:
                other["data_offsets"] = [o + k for o in other["data_offsets"]]
    elif change == "data length":
        k = draw(st.integers(1, 8))
        data = data[:-k] if draw(st.booleans()) else data + bytes(k)
    elif change == "missing field":
        del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif change == "not an object":
        entries[names[0]] = draw(st.sampled_from([[1, 2], 3, "F32", None]))
    header: dict[str, object] = {name: entries[name] for name in draw(st.permutations(names))}
    if change == "metadata":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    elif change == "bad metadata":
        header["__metadata__"] = draw(st.sampled_from([[], {"a": 1}, {"a": {"b": "c"}}, "x"]))
    return header, data, change


@pytest.mark.oracle
def test_fuzzed_headers_with_tensor_entries(tmp_path):
    """Files with 1-5 real tensor entries (every dtype loramerge reads, shapes with zero and
    empty dims, header order different from data order), most with one subtle change. The
    reader accepts exactly what the format's specification allows, reads every accepted tensor
    byte for byte (and row slices of it) as the safetensors package does, and refuses the rest
    with its own error."""
    counts: Counter[str] = Counter()
    path = tmp_path / "fuzz.safetensors"

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=headers_with_tensors(), padding=st.integers(0, 7))
    def run(case, padding):
        header, data, change = case
        raw = json.dumps(header).encode() + b" " * padding
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        valid = spec_verdict(header, len(data))
        found = _read_everything(path, counts)
        assert (found is not None) == valid, (change, header)
        if found is None:
            return
        counts[f"accepted after {change}"] += 1
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                assert found[name] == data[begin:end], name
        reference = _safetensors_reads(path)
        if reference is not None:
            counts["also read by safetensors"] += 1
            assert reference == found

    run()
    print(dict(counts))
    assert counts["accepted"] >= 60 and counts["refused"] >= 100, counts
    assert counts["tensors read"] >= 150 and counts["slices read"] >= 30, counts
    assert counts["accepted"] - counts["accepted after none"] >= 20, "subtle changes accepted"
    assert counts["also read by safetensors"] >= 0.9 * counts["accepted"], counts


REAL_FILES = [
    ADAPTERS / "llama-lora" / "adapter_model.safetensors",
    FIXTURES / "kohya" / "llama-lora.safetensors",
    BASES / "llama" / "model-00003-of-00003.safetensors",
]


@st.composite
def mutated_real_files(draw) -> tuple[bytes, str]:
    """A fixture file with one mutation: bytes changed in its length prefix, header or data,
    bytes inserted or deleted, the file cut short, or one value of its header rewritten."""
    original = draw(st.sampled_from(REAL_FILES)).read_bytes()
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    kind = draw(
        st.sampled_from(["header byte", "data byte", "prefix byte", "insert", "delete", "cut",
                         "header value"])
    )  # fmt: skip
    content = bytearray(original)
    if kind in ("header byte", "data byte", "prefix byte"):
        low, high = {"prefix byte": (0, 8), "header byte": (8, header_end)}.get(
            kind, (header_end, len(content))
        )
        at = draw(st.integers(low, high - 1))
        if draw(st.booleans()):
            content[at] ^= 1 << draw(st.integers(0, 7))
        else:
            content[at] = draw(st.integers(0, 255))
    elif kind in ("insert", "delete"):
        at = draw(st.integers(0, len(content) - 1))
        if kind == "insert":
            content[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del content[at : at + draw(st.integers(1, 8))]
    elif kind == "cut":
        del content[draw(st.integers(0, len(content) - 1)) :]
    else:  # one dtype, dim or offset of the header replaced; the length prefix kept right
        header = json.loads(original[8:header_end])
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        value = header[name][field]
        if field == "dtype":
            header[name][field] = draw(st.sampled_from(sorted(ITEMSIZE)))
        else:
            at = draw(st.integers(0, len(value) - 1)) if value else None
            if at is None:
                header[name][field] = [1]
            else:
                value[at] = max(0, value[at] + draw(st.sampled_from([-2, -1, 1, 2])))
        raw = json.dumps(header).encode()
        content = bytearray(struct.pack("<Q", len(raw)) + raw + original[header_end:])
    return bytes(content), kind


@pytest.mark.oracle
def test_fuzzed_real_files(tmp_path):
    """Real fixture files (a PEFT adapter, a kohya file with metadata, a bf16 base shard), each
    mutated once. Whatever loramerge accepts, it reads exactly as the safetensors package reads
    the same bytes; what it refuses, it refuses with its own error."""
    counts: Counter[str] = Counter()
    path = tmp_path / "mutated.safetensors"

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=mutated_real_files())
    def run(case):
        content, kind = case
        path.write_bytes(content)
        found = _read_everything(path, counts)
        reference = _safetensors_reads(path)
        if found is None:
            counts[f"refused after {kind}"] += 1
            return
        counts[f"accepted after {kind}"] += 1
        assert reference is not None, f"accepted a file safetensors refuses ({kind})"
        assert reference == found, kind

    run()
    print(dict(counts))
    assert counts["accepted"] >= 30 and counts["refused"] >= 100, counts
    assert counts["tensors read"] >= 1000, counts
    assert counts["accepted after data byte"] >= 10, counts
    assert counts["refused after header value"] >= 5, counts
