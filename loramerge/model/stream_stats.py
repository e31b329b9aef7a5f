"""What a streamed merge reports (torch-free, shared by both engines): bytes written, and per
module what rounding kept of the update."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# rounding that keeps fewer than this share of an update's elements changed gets a warning
ERASED_SHARE = 0.5
# called with (bytes done, bytes in all) as the output is written
Progress = Callable[[int, int], None]


def within(progress: Progress | None, before: int = 0, after: int = 0) -> Progress | None:
    """`progress` for one pass of a job that has `before` bytes done ahead of it and about
    `after` still to come: one bar over the whole job."""
    if progress is None:
        return None

    def update(done: int, total: int) -> None:
        progress(before + done, before + total + after)

    return update


@dataclass
class ModuleStats:
    """What rounding did to one module's update: elements changed vs the rounded base."""

    module: str
    tensor: str
    elements: int = 0
    changed: int = 0
    support: int | None = None  # elements a sparse update can change (SHiRA), else all

    @property
    def changed_share(self) -> float:
        total = self.support or self.elements
        return self.changed / total if total else 0.0


@dataclass
class StreamResult:
    bytes_written: int = 0
    modules: dict[str, ModuleStats] = field(default_factory=dict)
