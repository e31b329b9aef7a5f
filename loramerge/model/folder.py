"""A base model folder: config, shard headers, index, and the small files that travel with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramerge.errors import FormatError
from loramerge.io.hub import MODEL_FILES, resolve
from loramerge.io.json_files import read_json
from loramerge.io.safetensors_header import SafetensorsHeader, TensorEntry, read_header
from loramerge.io.safetensors_reader import SafetensorsReader
from loramerge.model.names import resolve_tensor_name

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files that are weights or adapters: never copied into a merged folder.
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".h5",
    ".msgpack",
    ".onnx",
)
_ADAPTER_FILES = {"adapter_config.json", INDEX_NAME}


@dataclass
class BaseModel:
    """A resolved base model: where each tensor lives and what its header says."""

    root: Path
    config: dict[str, Any]
    shard_names: list[str]
    headers: dict[str, SafetensorsHeader]
    has_index: bool

    def tensors(self) -> list[tuple[str, TensorEntry]]:
        """(shard name, entry) for every tensor, shard by shard in data order."""
        return [
            (shard, e) for shard in self.shard_names for e in self.headers[shard].entries.values()
        ]

    def locate(self) -> dict[str, tuple[str, TensorEntry]]:
        return {entry.name: (shard, entry) for shard, entry in self.tensors()}

    def shard_path(self, shard: str) -> Path:
        return self.root / shard

    def read_tensor(self, name: str) -> torch.Tensor | None:
        """The base tensor `name` refers to (matched the way merges match names), or None."""
        located = self.locate()
        found = resolve_tensor_name(name, located)
        if found is None:
            return None
        shard, _ = located[found]
        with SafetensorsReader(self.shard_path(shard)) as reader:
            return reader.read(found)

    def extra_files(self) -> list[Path]:
        """Config, tokenizer, generation and other small top-level files to copy."""
        files = []
        for path in sorted(self.root.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.name.endswith(_WEIGHT_SUFFIXES) or path.name in _ADAPTER_FILES:
                continue
            if path.name.startswith("adapter_model"):
                continue
            files.append(path)
        return files


def resolve_base(ref: str | Path) -> Path:
    """A local folder, or a hub repo id looked up in huggingface-hub's cache (then online)."""
    path = resolve(ref, what="base model folder", files=MODEL_FILES)
    if not path.is_dir():
        raise FormatError(
            "is a file; the base must be a model folder", file=path, hint="pass the folder"
        )
    return path


def _allowed_roots(root: Path) -> list[Path]:
    """Folders an index's shards may resolve into: the model folder itself and, for a
    huggingface-hub cache snapshot (`models--org--name/snapshots/<rev>`, whose files are links
    to `../../blobs/<hash>`), that repository's blob store."""
    roots = [root.resolve()]
    if root.parent.name == "snapshots":
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def _shard_inside(root: Path, index_path: Path, shard: object) -> str:
    """The shard name, if it names an existing file inside the model folder; else refused."""
    leaves = FormatError(
        f"names shard {shard!r}, which leaves the model folder",
        file=index_path,
        hint="an index may only name files inside its own folder",
    )
    if not isinstance(shard, str) or not shard or "\0" in shard:
        raise leaves
    relative = Path(shard)
    if relative.is_absolute() or ".." in relative.parts:
        raise leaves
    try:
        target = (root / relative).resolve()
    except (OSError, RuntimeError, ValueError):  # link loops, over-long names
        raise leaves from None
    if not any(allowed in target.parents for allowed in _allowed_roots(root)):
        raise FormatError(
            f"names shard {shard!r}, which links outside the model folder (to {target})",
            file=index_path,
            hint="an index may only name files inside its own folder",
        )
    if not target.is_file():
        raise FormatError(
            f"names shard {shard!r}, which does not exist",
            file=index_path,
            hint="the download is incomplete; fetch the missing shard",
        )
    return shard


def open_base(ref: str | Path) -> BaseModel:
    root = resolve_base(ref)
    config_path = root / "config.json"
    config = read_json(config_path) if config_path.exists() else {}
    index_path = root / INDEX_NAME
    if index_path.exists():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError("has no weight_map", file=index_path)
        shards = sorted({_shard_inside(root, index_path, s) for s in weight_map.values()})
        headers = {s: read_header(root / s) for s in shards}
        for name, shard in weight_map.items():
            if name not in headers[shard].entries:
                raise FormatError(
                    f"maps tensor {name!r} to {shard}, which does not hold it", file=index_path
                )
        has_index = True
    elif (root / SINGLE_NAME).is_file():
        shards = [SINGLE_NAME]
        headers = {SINGLE_NAME: read_header(root / SINGLE_NAME)}
        has_index = False
    else:
        found = sorted(p.name for p in root.glob("*.safetensors"))
        if not found:
            pickled = sorted(p.name for p in root.glob("*.bin"))
            what = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights"
            raise FormatError(
                f"holds {what}; loramerge merges into safetensors models",
                file=root,
                hint="pass a folder with model.safetensors or sharded safetensors and an index",
            )
        shards = found
        headers = {s: read_header(root / s) for s in shards}
        has_index = len(shards) > 1
    seen: dict[str, str] = {}
    for shard in shards:
        for name in headers[shard].entries:
            if name in seen:
                raise FormatError(f"tensor {name!r} is in both {seen[name]} and {shard}", file=root)
            seen[name] = shard
    return BaseModel(root, config, shards, headers, has_index)


def base_config_of(base: str | Path) -> dict[str, Any]:
    """The config.json of a base model folder or cached hub id (no weights are read)."""
    return read_json(resolve_base(base) / "config.json")
