"""A tensor known by its shape and dtype and read when it is used: every adapter's factors are
held this way (loramerge.adapter), so that planning needs no tensor data and a merge reads each
module's factors when it reaches the module."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy
    import torch

T = TypeVar("T")

# a tensor's stored bytes (uint8) and its safetensors dtype code, read without torch
RawRead = Callable[[], "tuple[numpy.ndarray, str]"]


class LazyTensor:
    """A tensor known by shape and dtype, loaded on first use and then kept.

    `dtype` may be given as a safetensors code ("BF16"), turned into a torch dtype when first
    asked for, so that an adapter is read and planned without importing torch; `raw`, where
    the tensor is stored as it is in a file, reads its bytes without torch.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype | str,
        load: Callable[[], torch.Tensor],
        raw: RawRead | None = None,
    ) -> None:
        self.shape = tuple(shape)
        self._dtype = dtype
        self._load = load
        self._value: torch.Tensor | None = None
        self.raw = raw

    @property
    def dtype(self) -> torch.dtype:
        if isinstance(self._dtype, str):
            from loramerge.io.safetensors_header import torch_dtype

            self._dtype = torch_dtype(self._dtype)
        return self._dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> LazyTensor:
        lazy = cls(tuple(tensor.shape), tensor.dtype, lambda: tensor)
        lazy._value = tensor
        return lazy

    @property
    def code(self) -> str | None:
        """The safetensors dtype code, where it was given as one (no torch needed)."""
        return self._dtype if isinstance(self._dtype, str) else None

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def load(self) -> torch.Tensor:
        if self._value is None:
            self._value = self.read()
        return self._value

    def read(self) -> torch.Tensor:
        """The value, without keeping it when it was not loaded yet: a streaming merge reads
        each module's factors when it gets to them, so memory does not grow with the adapter."""
        if self._value is not None:
            return self._value
        value = self._load()
        if tuple(value.shape) != self.shape:
            raise ValueError(
                f"lazy tensor loaded shape {tuple(value.shape)}, expected {self.shape}"
            )
        return value

    def float(self, keep: bool = True) -> torch.Tensor:
        import torch

        return (self.load() if keep else self.read()).to(torch.float32)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


class RecentValues:
    """Values computed by key, the last few kept (thread-safe): a module's two factors often
    come from one computation, and the merge engine's workers read them one after the other,
    so each is computed once while memory holds a few modules, not the adapter."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._kept: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            if key in self._kept:
                return self._kept[key]
        value = compute()
        with self._lock:
            self._kept[key] = value
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
        return value
