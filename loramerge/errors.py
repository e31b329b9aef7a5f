"""The one exception tree of loramerge: every user-facing failure carries file, module and hint."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LoramergeError(Exception):
    """A problem with the user's inputs or options, reported as one line without a traceback.

    `path` names the file at fault, `module` the adapter module where it applies, and `hint`
    says what the user can do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        module: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.module = module
        self.hint = hint

    def __str__(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}:")
        if self.module:
            parts.append(f"module {self.module}:")
        parts.append(self.message)
        text = " ".join(parts)
        if self.hint:
            text += f" ({self.hint})"
        return text


@contextmanager
def located(path: str | Path | None = None, module: str | None = None) -> Iterator[None]:
    """Name the file and module in a LoramergeError raised inside that does not name them yet
    (the numeric helpers below see only tensors)."""
    try:
        yield
    except LoramergeError as exc:
        if exc.path is None and path is not None:
            exc.path = str(path)
        if exc.module is None:
            exc.module = module
        raise


class FormatError(LoramergeError):
    """A file is not in the format it claims to be in, or is damaged."""


class UnknownFormatError(LoramergeError):
    """No reader recognises a path."""


class ShapeMismatchError(LoramergeError):
    """An adapter does not fit the base model it is applied to."""


class OptionError(LoramergeError):
    """Options that contradict each other or the inputs."""


class OutputError(LoramergeError):
    """The output cannot be written where it was asked to go."""
