"""Checks of option values that several jobs share: each kind of value is checked here once,
and refused with a UsageError that names the option by its id."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from loramerge.errors import UsageError, opt


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_rank(value: Any, option: str = "rank") -> int:
    """A rank: a whole number of at least 1."""
    if not _is_integer(value) or value < 1:
        raise UsageError("must be a whole number of at least 1", option=option, value=value)
    return value


def check_count(value: Any, option: str, least: int = 1) -> int:
    """A count (tokens, sequences, batches): a whole number of at least `least`."""
    if not _is_integer(value) or value < least:
        raise UsageError(f"must be a whole number of at least {least}", option=option, value=value)
    return value


def check_share(value: Any, option: str) -> float:
    """A share of a whole: a number in (0, 1]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= 1
    ):
        raise UsageError("must be a share in (0, 1], e.g. 0.9", option=option, value=value)
    return float(value)


def check_tolerance(value: Any, option: str) -> float:
    """A tolerance: a finite number of at least 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise UsageError("must be a number of at least 0", option=option, value=value)
    if not math.isfinite(value):
        raise UsageError("must be finite", option=option, value=value)
    return float(value)


def check_choice(value: str, choices: Sequence[str], option: str) -> str:
    """One of `choices` (the names of a registry or table)."""
    if value not in choices:
        raise UsageError(f"choose one of {', '.join(choices)}", option=option, value=value)
    return value


def exclusive(option: str, given: bool, other: str, other_given: bool) -> None:
    """Refuse two options that exclude each other."""
    if given and other_given:
        raise UsageError(f"cannot be combined with {opt(other)}", option=option)


def needs(option: str, given: bool, other: str, other_given: bool, why: str = "") -> None:
    """Refuse `option` without the `other` option it needs."""
    if given and not other_given:
        reason = f": {why}" if why else ""
        raise UsageError(f"needs {opt(other)}{reason}", option=option)
