"""Helpers shared by format readers: lazy tensor files, JSON configs, pickle via weights_only."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import LazyTensor
from loramerge.errors import FormatError
from loramerge.safetensors_io import SafetensorsReader, read_header, torch_dtype


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError("file not found", path=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(
            f"is not valid JSON ({exc})", path=path, hint="fix or regenerate the config file"
        ) from None
    if not isinstance(data, dict):
        raise FormatError("must hold a JSON object", path=path)
    return data


def lazy_safetensors(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Every tensor of a safetensors file as a LazyTensor, plus the file's metadata."""
    header = read_header(path)

    def loader(name: str):
        def load() -> torch.Tensor:
            with SafetensorsReader(path) as reader:
                return reader.read(name)

        return load

    tensors = {
        name: LazyTensor(entry.shape, torch_dtype(entry.dtype), loader(name))
        for name, entry in header.entries.items()
    }
    return tensors, header.metadata


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded only through torch.load(weights_only=True)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FormatError("file not found", path=path) from None
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "it is not a plain tensor state dict"
        raise FormatError(
            f"refused: the pickle needs more than tensors to load ({reason})",
            path=path,
            hint="loramerge never runs code from a file; convert it to safetensors where trusted",
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise FormatError(f"cannot be read as a torch file ({exc})", path=path) from None
    if not isinstance(data, dict):
        raise FormatError("does not hold a state dict (a mapping of names to tensors)", path=path)
    for key in ("state_dict", "model"):
        if key in data and isinstance(data[key], dict):
            data = data[key]
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise FormatError("holds no tensors", path=path)
    return tensors


def lazy_weights(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Tensors of a safetensors or pickled weights file, lazily where the format allows."""
    if path.suffix == ".safetensors":
        return lazy_safetensors(path)
    return {k: LazyTensor.of(v) for k, v in load_pickle_weights(path).items()}, {}


def require_positive(value: Any, what: str, path: Path, module: str | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FormatError(
            f"{what} must be a positive number, got {value!r}", path=path, module=module
        )
    return float(value)
