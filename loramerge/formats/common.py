"""Helpers shared by format readers: lazy tensor files, pickle via weights_only, config values."""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramerge.adapter import LazyTensor
from loramerge.errors import FormatError
from loramerge.io.safetensors_header import read_header
from loramerge.io.safetensors_reader import SafetensorsReader

if TYPE_CHECKING:
    import numpy
    import torch


def lazy_safetensors(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Every tensor of a safetensors file as a LazyTensor (its stored bytes readable without
    torch), plus the file's metadata."""
    header = read_header(path)
    # one reader, opened on first use and shared: re-validating the header for every tensor
    # costs O(tensors^2) on adapters with thousands of tensors
    shared: list[SafetensorsReader] = []

    def reader() -> SafetensorsReader:
        if not shared:
            shared.append(SafetensorsReader(path))
        return shared[0]

    def loader(name: str):
        def load() -> torch.Tensor:
            return reader().read(name)

        def raw() -> tuple[numpy.ndarray, str]:
            return reader().read_array(name), header.entries[name].dtype

        return load, raw

    tensors = {
        name: LazyTensor(entry.shape, entry.dtype, *loader(name))
        for name, entry in header.entries.items()
    }
    return tensors, header.metadata


def _refusal_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler objected to, in a few words."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it asks to import and call {found.group(1)}, which is code, not tensor data"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"it uses pickle instruction {found.group(1)}, which plain tensor files never need"
    return "it holds objects other than tensors and plain containers"


def _torch_load(path: Path) -> Any:
    """torch.load(weights_only=True), a zip-format file mapped rather than read: only the
    tensors used are paged in, as file pages the kernel can drop (a trainer checkpoint holds
    the model). Where the file cannot be mapped (some network and FUSE file systems), it is
    read; what the unpickler refuses is refused either way."""
    import torch

    if zipfile.is_zipfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, FileNotFoundError):
            raise
        except Exception:  # read instead, which reports a damaged file
            pass
    return torch.load(path, map_location="cpu", weights_only=True)


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded only through torch.load(weights_only=True).

    Anything the weights-only unpickler refuses is refused with the reason; the file is never
    unpickled any other way.
    """
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols on stderr; the error line says what matters
            warnings.simplefilter("ignore")
            data = _torch_load(path)
    except FileNotFoundError:
        raise FormatError("file not found", file=path) from None
    except pickle.UnpicklingError as exc:
        raise FormatError(
            f"refused: this pickle is not a plain tensor file, {_refusal_reason(exc)}; loramerge "
            "loads pickles only with torch.load(weights_only=True) and never runs code from a file",
            file=path,
            hint="use the adapter's .safetensors file, or convert it where you trust its source",
        ) from None
    except Exception as exc:  # a damaged file can fail anywhere inside torch's zip/pickle readers
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FormatError(
            f"cannot be read as a torch file ({type(exc).__name__}: {reason})", file=path
        ) from None
    import torch

    if not isinstance(data, dict):
        raise FormatError("does not hold a state dict (a mapping of names to tensors)", file=path)
    for key in ("state_dict", "model"):
        if key in data and isinstance(data[key], dict):
            data = data[key]
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise FormatError("holds no tensors", file=path)
    return tensors


def lazy_weights(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Tensors of a safetensors or pickled weights file, lazily where the format allows."""
    if path.suffix == ".safetensors":
        return lazy_safetensors(path)
    return {k: LazyTensor.of(v) for k, v in load_pickle_weights(path).items()}, {}


def require_positive(value: Any, what: str, path: Path, module: str | None = None) -> float:
    """A positive, finite number from a config (booleans, strings and Infinity refused)."""
    number = _finite(value)
    if number is None or not number > 0:
        raise FormatError(
            f"{what} must be a positive number, got {_shown(value)}", file=path, module=module
        )
    return number


def require_rank(value: Any, what: str, path: Path, module: str | None = None) -> int:
    """A positive whole number (8 or 8.0) from a config."""
    number = _finite(value)
    if number is None or not number >= 1 or not number.is_integer():
        raise FormatError(
            f"{what} must be a positive whole number, got {_shown(value)}",
            file=path,
            module=module,
        )
    return int(number)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer with hundreds of digits
        return None
    return number if math.isfinite(number) else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
