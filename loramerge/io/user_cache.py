"""Small JSON answers kept between runs in the user's cache folder, one file per key.

A file is named by the hash of its key and records the key in full; it is used only when the
recorded key equals the one asked for (the caller then checks every field). Anything else (a
foreign or damaged file, one too large, a folder that cannot be read or written) is a miss,
never an error: a cache only saves time.

The folder is $LORAMERGE_CACHE_DIR, else $XDG_CACHE_HOME/loramerge, else ~/.cache/loramerge;
LORAMERGE_CACHE_DIR set to an empty string turns every cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

MAX_BYTES = 64 << 20


def cache_folder(kind: str) -> Path | None:
    """Where answers of one kind are kept, or None when caching is off."""
    chosen = os.environ.get("LORAMERGE_CACHE_DIR")
    if chosen is not None:
        return Path(chosen) / kind if chosen else None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "loramerge" / kind


def _file_for(folder: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return folder / f"{digest}.json"


def load(kind: str, key: dict[str, Any]) -> Any:
    """The value kept under `key`, or None."""
    folder = cache_folder(kind)
    if folder is None:
        return None
    try:
        with open(_file_for(folder, key), "rb") as handle:
            if os.fstat(handle.fileno()).st_size > MAX_BYTES:
                return None
            found = json.loads(handle.read())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(found, dict) or found.get("key") != key:
        return None
    return found.get("value")


def store(kind: str, key: dict[str, Any], value: Any) -> None:
    """Keep a value (atomically: a reader sees the old file, the new one or none)."""
    folder = cache_folder(kind)
    if folder is None:
        return
    text = json.dumps({"key": key, "value": value}, separators=(",", ":"))
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(temp, _file_for(folder, key))
        except OSError:
            os.unlink(temp)
