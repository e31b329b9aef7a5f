"""The safetensors header: dtype codes, and the validating parser every reader relies on.

Everything a file claims (sizes, shapes, offsets, metadata) is checked here against the file's
real size before any tensor byte is read.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramerge.errors import FormatError
from loramerge.io import dtypes as dtype_table

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000
FLOAT_CODES = dtype_table.FLOAT_CODES


@cache
def _torch_dtypes() -> dict[str, tuple[torch.dtype, int]]:
    """safetensors dtype code -> (torch dtype, bytes per element), from the one table in
    io/dtypes; built on first use, so that headers are parsed without importing torch."""
    import torch

    return {code: (getattr(torch, name), size) for code, (name, size) in dtype_table.DTYPES.items()}


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # the table above, for callers that want it whole
        return _torch_dtypes()
    raise AttributeError(name)


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code (e.g. "BF16") of a torch dtype."""
    for code, (found, _) in _torch_dtypes().items():
        if found == dtype:
            return code
    raise FormatError(f"dtype {dtype} cannot be stored in safetensors")


def torch_dtype(code: str) -> torch.dtype:
    return _torch_dtypes()[code][0]


def itemsize(code: str) -> int:
    return dtype_table.DTYPES[code][1]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: offsets are relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along the first axis (the whole tensor for 0-d tensors)."""
        if not self.shape:
            return self.nbytes
        return math.prod(self.shape[1:]) * itemsize(self.dtype)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header; `entries` are in data order."""

    path: Path
    data_start: int
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


def data_error(path: Path, message: str) -> FormatError:
    return FormatError(
        message,
        file=path,
        hint="the file is damaged or not safetensors; download or export it again",
    )


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object hook that refuses repeated keys: json.loads would silently keep the last."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def load_json_strict(text: str | bytes) -> object:
    """json.loads that refuses repeated keys (raises DuplicateKeyError, a ValueError)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def parse_header(path: Path, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Validate a header's JSON bytes against the file size; pure so that it can be fuzzed."""
    data_start = 8 + len(raw)
    try:
        parsed = load_json_strict(raw.decode("utf-8"))
    except DuplicateKeyError as exc:
        raise data_error(path, f"header names {exc.key!r} twice") from None
    # ValueError also covers integers longer than Python's 4300-digit conversion limit
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise data_error(path, f"header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(parsed, dict):
        raise data_error(path, "header is not a JSON object")
    metadata = parsed.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise data_error(path, "__metadata__ must map strings to strings")
    entries = [_parse_entry(path, name, info) for name, info in parsed.items()]
    entries.sort(key=lambda entry: (entry.begin, entry.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            kind = "overlaps the previous tensor" if entry.begin < position else "leaves a gap"
            raise data_error(
                path, f"tensor {entry.name!r} {kind} (offset {entry.begin}, expected {position})"
            )
        position = entry.end
    if data_start + position != file_size:
        if data_start + position > file_size:
            raise data_error(
                path,
                f"file is truncated: {file_size} bytes, the header needs {data_start + position}",
            )
        raise data_error(
            path, f"{file_size - data_start - position} trailing bytes after the last tensor"
        )
    return SafetensorsHeader(path, data_start, {e.name: e for e in entries}, dict(metadata))


def _parse_entry(path: Path, name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict):
        raise data_error(path, f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in dtype_table.DTYPES:
        raise data_error(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**53 for d in shape):
        raise data_error(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and 0 <= o < 2**63 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise data_error(path, f"tensor {name!r}: data_offsets must be two increasing integers")
    expected = math.prod(shape) * itemsize(dtype)
    if offsets[1] - offsets[0] != expected:
        raise data_error(
            path,
            f"tensor {name!r}: shape {shape} in {dtype} needs {expected} bytes, "
            f"the offsets give {offsets[1] - offsets[0]}",
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def header_from_fd(fd: int, path: Path) -> SafetensorsHeader:
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise FormatError("is a folder, expected a .safetensors file", file=path)
    if not stat.S_ISREG(info.st_mode):
        raise FormatError("is not a regular file, expected a .safetensors file", file=path)
    file_size = info.st_size
    prefix = os.pread(fd, 8, 0)
    if len(prefix) < 8:
        raise data_error(path, f"file is {file_size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise data_error(path, f"header claims {header_len} bytes, above the 100 MB limit")
    if 8 + header_len > file_size:
        raise data_error(path, f"header claims {header_len} bytes but the file has {file_size}")
    raw = b""
    while len(raw) < header_len:
        chunk = os.pread(fd, header_len - len(raw), 8 + len(raw))
        if not chunk:
            raise data_error(path, "file ended inside its header")
        raw += chunk
    return parse_header(path, raw, file_size)


def open_readonly(path: Path) -> int:
    """An O_RDONLY descriptor; a folder, a missing file or an unreadable one is a FormatError."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang; it is refused as not a regular file
        return os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise FormatError("is a folder, expected a .safetensors file", file=path) from None
    except FileNotFoundError:
        raise FormatError("file not found", file=path) from None
    except PermissionError:
        raise FormatError("permission denied", file=path) from None
    except (OSError, ValueError) as exc:
        raise FormatError(f"cannot be opened ({exc})", file=path) from None


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without reading any tensor data."""
    path = Path(path)
    fd = open_readonly(path)
    try:
        return header_from_fd(fd, path)
    except OSError as exc:
        raise FormatError(f"cannot be read ({exc.strerror or exc})", file=path) from None
    finally:
        os.close(fd)
