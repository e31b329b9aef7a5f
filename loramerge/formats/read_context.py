"""The base model of the adapter being read, for readers called without ReadOptions.

`peft.read(folder)` takes no options, yet PEFT VeRA and MiSS adapters need each module's input
size, which only the base model's weight shapes give: `registry.read_adapter` sets the base
here for the duration of a read, and `peft_tuners` looks it up. Torch-free, like the registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

_BASE: ContextVar[str | Path | None] = ContextVar("loramerge_read_base", default=None)


@contextmanager
def reading_base(base: str | Path | None) -> Iterator[None]:
    token = _BASE.set(base)
    try:
        yield
    finally:
        _BASE.reset(token)


def current_base() -> str | Path | None:
    return _BASE.get()
