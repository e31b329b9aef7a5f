"""`import torch` without loading torch until a command touches it.

Importing torch costs 1.2-1.6 s on the benchmark machine, and many loramerge modules import it
at the top although a plain merge (loramerge.model.fast_stream) never uses it. The command
line therefore puts a stand-in module under the name `torch` before any command runs: modules
that import torch get the stand-in, and the first attribute anything asks of it (torch.float32,
torch.Tensor, a submodule) imports the real torch, which from then on is in sys.modules and
answers through the stand-in too. Nothing changes where torch is already imported (a library
user's process, the tests).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_LOCK = threading.RLock()


class _TorchOnDemand(types.ModuleType):
    """Stands for torch until first use; then forwards to the real module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_real(self), name)

    def __dir__(self) -> list[str]:
        return dir(_real(self))


def _real(stand_in: _TorchOnDemand) -> types.ModuleType:
    with _LOCK:
        found = stand_in.__dict__.get("_loaded")
        if found is None:
            if sys.modules.get("torch") is stand_in:
                del sys.modules["torch"]
            found = importlib.import_module("torch")
            stand_in.__dict__["_loaded"] = found
        return found


def install() -> None:
    """Put the stand-in in place, unless torch is imported already or cannot be found."""
    if "torch" in sys.modules:
        return
    spec = importlib.util.find_spec("torch")
    if spec is None:
        return
    stand_in = _TorchOnDemand("torch")
    # what the import system reads of a module in sys.modules; `__path__` is left out, so
    # that importing a submodule (torch.nn) loads torch itself first
    stand_in.__spec__ = spec
    stand_in.__file__ = spec.origin
    stand_in.__loader__ = spec.loader
    sys.modules["torch"] = stand_in


def loaded() -> bool:
    """Whether the real torch has been imported."""
    found = sys.modules.get("torch")
    return found is not None and not isinstance(found, _TorchOnDemand)
