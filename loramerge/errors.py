"""The one exception tree of loramerge. Every error carries what it knows as fields: the file at
fault, the adapter module, the option and its value, and a hint.

Messages never spell command-line flags. An option is named by its id, the option's long name
with underscores (`max_shard_size`, `rank`, `format`): in the `option` field, or inside a
message or hint as `opt("stats")`. `str()` shows ids as they are; the command line shows every
id as its flag (`--stats`) through `render`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# An option id inside a message, between two unit separators: a character no message, path or
# value shows, so that a renderer can find the ids again.
_MARK = "\x1f"
_OPTION_REF = re.compile(f"{_MARK}([a-z][a-z0-9_]*){_MARK}")


def opt(option: str) -> str:
    """An option named inside a message or hint: `opt("stats")`."""
    return f"{_MARK}{option}{_MARK}"


def _as_id(option: str) -> str:
    return option


def show_options(text: str, flag: Callable[[str], str] = _as_id) -> str:
    """`text` with every `opt()` reference shown by `flag` (by default the id itself)."""
    return _OPTION_REF.sub(lambda match: flag(match.group(1)), text)


def option_ids(text: str) -> list[str]:
    """The option ids a message or hint names through `opt()`."""
    return _OPTION_REF.findall(text)


def shown_value(value: Any) -> str:
    """A value as a user would type it: 0.9, four, '' (quoted only when it has no clear end)."""
    text = str(value)
    return repr(text) if not text or text != text.strip() or " " in text else text


class LoramergeError(Exception):
    """A problem with the user's inputs or options, reported as one line without a traceback.

    `file` names the file at fault, `module` the adapter module where it applies, `option` the
    option (by id) and `value` the value it was given, and `hint` says what the user can do.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        module: str | None = None,
        option: str | None = None,
        value: Any = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = str(file) if file is not None else None
        self.module = module
        self.option = option
        self.value = value
        self.hint = hint

    def fields(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this error (for a copy with a new message)."""
        return {
            "file": self.file,
            "module": self.module,
            "option": self.option,
            "value": self.value,
            "hint": self.hint,
        }

    def render(self, flag: Callable[[str], str] = _as_id, *, with_option: bool = True) -> str:
        """One line: `file: module m: option value: message (hint)`, options shown by `flag`
        (the option and value left out when the caller names them itself)."""
        parts = []
        if self.file:
            parts.append(f"{self.file}:")
        if self.module:
            parts.append(f"module {self.module}:")
        if self.option and with_option:
            parts.append(f"{self.option_text(flag)}:")
        parts.append(show_options(self.message, flag))
        text = " ".join(parts)
        if self.hint:
            text += f" ({show_options(self.hint, flag)})"
        return text

    def option_text(self, flag: Callable[[str], str] = _as_id) -> str:
        """The option and the value it was given, e.g. `rank 0`; empty without an option."""
        if not self.option:
            return ""
        if self.value is None or isinstance(self.value, bool):
            return flag(self.option)
        return f"{flag(self.option)} {shown_value(self.value)}"

    def __str__(self) -> str:
        return self.render()


@contextmanager
def located(file: str | Path | None = None, module: str | None = None) -> Iterator[None]:
    """Name the file and module in a LoramergeError raised inside that does not name them yet
    (the numeric helpers below see only tensors)."""
    try:
        yield
    except LoramergeError as exc:
        if exc.file is None and file is not None:
            exc.file = str(file)
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
    """An option that the inputs cannot satisfy (a rank above the adapter's, an engine that
    cannot serve what the adapter holds)."""


class UsageError(OptionError):
    """Options that are wrong whatever the inputs: a value out of range or not among the
    choices, options that exclude or need each other. The command line exits 2 on it."""


class OutputError(LoramergeError):
    """The output cannot be written where it was asked to go."""


class MismatchError(LoramergeError):
    """Two things that should mean the same do not (what `verify` reports)."""


def unmeasurable_factors() -> LoramergeError:
    """Why factors holding NaN or Inf (which --allow-nonfinite let through) cannot be measured
    or reduced."""
    return LoramergeError(
        "LoRA factors contain NaN or infinite values, which have no SVD or norm",
        hint=f"remove them from the adapter; {opt('allow_nonfinite')} only lets plain merges "
        "and conversions through",
    )
