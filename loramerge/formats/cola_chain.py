"""COLA chain inputs: an ordered list of adapter paths, or one folder with a `cola_chain.json`.

The manifest (documented in docs/fold.md) is a JSON object:

    {"format": "loramerge-cola-chain", "version": 1,
     "links": [{"path": "link-1"}, {"path": "link-2", "weight": 0.5, "format": "kohya"}]}

`links` lists the links in training order. `path` is relative to the manifest's folder and must
stay inside it; `weight` (default 1.0) multiplies that link's scale; `format` names the link's
adapter format when detection is not wanted. An optional `description` string is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from loramerge.adapter import Adapter
from loramerge.errors import FormatError, LoramergeError, OptionError
from loramerge.formats.registry import ReadOptions, read_adapter
from loramerge.io.json_files import read_json

MANIFEST_NAME = "cola_chain.json"
MANIFEST_FORMAT = "loramerge-cola-chain"
MANIFEST_VERSION = 1
_LINK_KEYS = {"path", "weight", "format"}
_TOP_KEYS = {"format", "version", "links", "description"}


@dataclass
class ChainLink:
    """One link: its 1-based place in the chain, where it was read from, its weight."""

    index: int
    path: Path
    weight: float
    adapter: Adapter


@dataclass
class Chain:
    links: list[ChainLink]
    folder: Path | None = None  # the chain folder, when the links came from a manifest

    @property
    def inputs(self) -> list[Path]:
        """Every path read, so that no output lands inside one of them."""
        paths = [link.path for link in self.links]
        return [self.folder, *paths] if self.folder is not None else paths


def in_link(exc: LoramergeError, index: int) -> LoramergeError:
    """The same error, its message prefixed with the link it concerns."""
    return type(exc)(f"link {index}: {exc.message}", **exc.fields())


def is_chain_folder(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


@dataclass(frozen=True)
class ManifestEntry:
    path: Path
    weight: float
    fmt: str | None


def read_manifest(folder: Path) -> list[ManifestEntry]:
    """The links a chain folder lists, in order, each path checked to stay inside the folder."""
    manifest = folder / MANIFEST_NAME
    data = read_json(manifest)
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise FormatError(
            f"unknown key {unknown[0]!r}", file=manifest, hint=f"allowed: {sorted(_TOP_KEYS)}"
        )
    if data.get("format") != MANIFEST_FORMAT:
        raise FormatError(
            f"format is {data.get('format')!r}, expected {MANIFEST_FORMAT!r}", file=manifest
        )
    version = data.get("version")
    if version != MANIFEST_VERSION or isinstance(version, bool):
        raise FormatError(
            f"version {version!r} is not one this loramerge reads ({MANIFEST_VERSION})",
            file=manifest,
        )
    links = data.get("links")
    if not isinstance(links, list) or not links:
        raise FormatError("links must be a non-empty list", file=manifest)
    return [_entry(folder, manifest, position, item) for position, item in enumerate(links, 1)]


def _entry(folder: Path, manifest: Path, position: int, item: Any) -> ManifestEntry:
    where = f"links[{position - 1}]"
    if not isinstance(item, dict):
        raise FormatError(f"{where} must be an object with a path", file=manifest)
    unknown = sorted(set(item) - _LINK_KEYS)
    if unknown:
        raise FormatError(
            f"{where} has the unknown key {unknown[0]!r}",
            file=manifest,
            hint=f"allowed: {sorted(_LINK_KEYS)}",
        )
    text = item.get("path")
    if not isinstance(text, str) or not text.strip():
        raise FormatError(f"{where}.path must be a non-empty string", file=manifest)
    weight = item.get("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
    ):
        raise FormatError(f"{where}.weight must be a finite number, got {weight!r}", file=manifest)
    fmt = item.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise FormatError(f"{where}.format must be a string", file=manifest)
    return ManifestEntry(_inside(folder, manifest, where, text), float(weight), fmt)


def _inside(folder: Path, manifest: Path, where: str, text: str) -> Path:
    """folder/text, refused when it is absolute or resolves (through .. or symlinks) outside."""
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute():
        raise FormatError(
            f"{where}.path {text!r} is absolute",
            file=manifest,
            hint="link paths are relative to the chain folder and stay inside it",
        )
    root = folder.resolve()
    resolved = (folder / text).resolve()
    if resolved == root or root not in resolved.parents:
        raise FormatError(
            f"{where}.path {text!r} leads outside the chain folder",
            file=manifest,
            hint="link paths are relative to the chain folder and stay inside it",
        )
    return folder / text


def read_chain(
    paths: Sequence[str | Path], *, fmt: str | None = None, options: ReadOptions | None = None
) -> Chain:
    """Read every link: `paths` are the links in training order, or one chain folder."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise OptionError("a chain needs at least one link")
    folder = None
    if len(paths) == 1 and is_chain_folder(paths[0]):
        folder = paths[0]
        entries = read_manifest(folder)
        if fmt is not None:
            entries = [ManifestEntry(e.path, e.weight, e.fmt or fmt) for e in entries]
    else:
        nested = [p for p in paths if is_chain_folder(p)]
        if nested:
            raise OptionError(
                f"{nested[0]} is a chain folder ({MANIFEST_NAME}); pass it alone, not with links"
            )
        entries = [ManifestEntry(p, 1.0, fmt) for p in paths]
    links = []
    for index, entry in enumerate(entries, 1):
        try:
            adapter = read_adapter(entry.path, entry.fmt, options)
            _refuse_dense(adapter)
        except LoramergeError as exc:
            raise in_link(exc, index) from exc
        links.append(ChainLink(index, entry.path, entry.weight, adapter))
    return Chain(links, folder)


def _refuse_dense(adapter: Adapter) -> None:
    from loramerge.adapter_checks import refuse_dense_updates

    refuse_dense_updates(adapter, "a COLA chain link")
