"""JSON files from users' folders: config files read strictly (repeated keys refused)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loramerge.errors import FormatError
from loramerge.io.safetensors_header import DuplicateKeyError, load_json_strict


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a config file; repeated keys are refused, not silently resolved."""
    if path.exists() and not path.is_file() and not path.is_dir():
        # a named pipe or a device: reading it could block forever or never end
        raise FormatError("is not a regular file, expected a JSON file", file=path)
    try:
        data = load_json_strict(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError("file not found", file=path) from None
    except IsADirectoryError:
        raise FormatError("is a folder, expected a JSON file", file=path) from None
    except OSError as exc:
        raise FormatError(f"cannot be read ({exc.strerror or exc})", file=path) from None
    except DuplicateKeyError as exc:
        raise FormatError(
            f"names the key {exc.key!r} twice, so which value is meant is ambiguous",
            file=path,
            hint="keep one of them",
        ) from None
    # ValueError: JSONDecodeError, and integers beyond Python's digit limit
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise FormatError(
            f"is not valid JSON ({reason})", file=path, hint="fix or regenerate the config file"
        ) from None
    if not isinstance(data, dict):
        raise FormatError("must hold a JSON object", file=path)
    return data
