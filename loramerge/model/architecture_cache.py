"""What transformers answered about a base's architecture, kept on disk between runs.

Asking transformers (loramerge.model.architecture) means importing it, 1.5-2 s before a merge
can plan, while the answers are a little plain data: the model class, its modules' kinds and
parameters, its ties and where each parameter is stored. They depend only on config.json and the
installed transformers and torch, so each answer is kept as a JSON file in the user's cache
folder (loramerge.io.user_cache), keyed by (config, versions). A kept answer is used only when
its key is the present one and every field has the expected type and shape; anything else is a
miss: transformers is asked again and the file rewritten. Nothing in a file is run.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from loramerge.adapter import ModuleKind
from loramerge.io import user_cache
from loramerge.model.architecture import Architecture, ModuleInfo, NoArchitecture
from loramerge.model.stored_layout import StoredPiece

KIND = "architectures"
FORMAT = 1  # bump when what is stored, or how it is computed, changes
Answer = Architecture | NoArchitecture


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cache_key(config: dict[str, Any]) -> dict[str, Any]:
    """Everything an answer depends on: the config and the versions that interpret it."""
    return {
        "format": FORMAT,
        "transformers": installed("transformers"),
        "torch": installed("torch"),
        "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
    }


def load(config: dict[str, Any]) -> Answer | None:
    """The kept answer for this config and these versions, or None (a miss)."""
    found = user_cache.load(KIND, cache_key(config))
    if found is None:
        return None
    try:
        return decode(found)
    except (TypeError, ValueError, KeyError):
        return None


def store(config: dict[str, Any], answer: Answer) -> None:
    user_cache.store(KIND, cache_key(config), encode(answer))


def encode(answer: Answer) -> dict[str, Any]:
    if isinstance(answer, NoArchitecture):
        return {"reason": answer.reason}
    pieces = None
    if answer.pieces is not None:
        pieces = [
            [param, found if isinstance(found, str) else [_piece(p) for p in found]]
            for param, found in answer.pieces.items()
        ]
    return {
        "model_class": answer.model_class,
        "base_model_prefix": answer.base_model_prefix,
        "modules": [
            [m.path, m.kind.value if m.kind else None, list(m.parameters), m.experts_transposed]
            for m in answer.modules.values()
        ],
        "parameters": [[name, list(shape)] for name, shape in answer.parameters.items()],
        "tied": [[target, source] for target, source in answer.tied.items()],
        "pieces": pieces,
    }


def _piece(piece: StoredPiece) -> list[Any]:
    index = [list(i) if isinstance(i, tuple) else i for i in piece.index]
    return [piece.name, index, piece.transposed]


def decode(found: Any) -> Answer:
    """An answer from its JSON form; TypeError or ValueError for anything malformed."""
    fields = _object(found)
    if set(fields) == {"reason"}:
        return NoArchitecture(_text(fields["reason"]))
    modules = {}
    for path, kind, params, transposed in (_items(m, 4) for m in _array(fields["modules"])):
        info = ModuleInfo(
            _text(path),
            None if kind is None else ModuleKind(_text(kind)),
            tuple(_text(p) for p in _array(params)),
            _flag(transposed),
        )
        modules[info.path] = info
    parameters = {
        _text(name): tuple(_count(d) for d in _array(shape))
        for name, shape in (_items(p, 2) for p in _array(fields["parameters"]))
    }
    tied = {_text(t): _text(s) for t, s in (_items(p, 2) for p in _array(fields["tied"]))}
    pieces = None
    if fields["pieces"] is not None:
        pieces = {}
        for param, where in (_items(p, 2) for p in _array(fields["pieces"])):
            pieces[_text(param)] = (
                where if isinstance(where, str) else tuple(_read_piece(p) for p in _array(where))
            )
        if set(pieces) != set(parameters):
            raise ValueError("pieces for other parameters than the model's")
    if any(t not in parameters or s not in parameters for t, s in tied.items()):
        raise ValueError("ties between unknown parameters")
    return Architecture(
        _text(fields["model_class"]), _text(fields["base_model_prefix"]),
        modules, parameters, tied, pieces,
    )  # fmt: skip


def _read_piece(found: Any) -> StoredPiece:
    name, index, transposed = _items(found, 3)
    entries: list[int | tuple[int, int]] = []
    for entry in _array(index):
        if isinstance(entry, list):
            low, high = (_count(e) for e in _items(entry, 2))
            entries.append((low, high))
        else:
            entries.append(_count(entry))
    return StoredPiece(_text(name), tuple(entries), _flag(transposed))


def _object(found: Any) -> dict[str, Any]:
    if not isinstance(found, dict):
        raise TypeError("not an object")
    return found


def _array(found: Any) -> list[Any]:
    if not isinstance(found, list):
        raise TypeError("not an array")
    return found


def _items(found: Any, count: int) -> list[Any]:
    if len(_array(found)) != count:
        raise ValueError(f"not {count} items")
    return found


def _text(found: Any) -> str:
    if not isinstance(found, str):
        raise TypeError("not a string")
    return found


def _count(found: Any) -> int:
    if not isinstance(found, int) or isinstance(found, bool) or found < 0:
        raise TypeError("not a count")
    return found


def _flag(found: Any) -> bool:
    if not isinstance(found, bool):
        raise TypeError("not a boolean")
    return found
