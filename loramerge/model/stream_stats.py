"""What a streamed merge reports (torch-free, shared by both engines): bytes written, and per
module what rounding kept of the update."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# rounding that keeps fewer than this share of an update's elements changed gets a warning
ERASED_SHARE = 0.5
# called with (bytes done, bytes in all) as the output is written
Progress = Callable[[int, int], None]


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
