"""LoRA factors as numpy arrays, for the paths that run without torch: a factor stored as it is
in a file read as float32, and factors computed with numpy held as lazy tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy

from loramerge.adapter import LazyTensor
from loramerge.ops import bits

if TYPE_CHECKING:
    import torch


def readable(factor: LazyTensor) -> bool:
    """Whether `float32_matrix` reads the factor without torch."""
    return factor.raw is not None and factor.code in bits.WIDENED and not factor.loaded


def float32_matrix(factor: LazyTensor) -> numpy.ndarray:
    """A factor as a float32 matrix (trailing dimensions flattened): widened from its stored
    bytes where it is `readable`, else computed or loaded by torch (which the factor's reader has
    then loaded) and cast as the torch engine casts it."""
    if readable(factor):
        assert factor.raw is not None
        stored, code = factor.raw()
        if code == "F32":  # the bytes just read, seen as float32: no second copy
            return bits.as_values(stored, code).reshape(factor.shape[0], -1)
        widened = numpy.empty(factor.shape, dtype=numpy.float32)
        return bits.widen_into(stored, code, widened).reshape(factor.shape[0], -1)
    value = factor.float(keep=False).contiguous()
    return value.numpy().reshape(factor.shape[0], -1)


def stored_values(factor: LazyTensor) -> tuple[numpy.ndarray, str]:
    """A `readable` factor's values in their stored dtype (bfloat16 as uint16), shaped."""
    assert readable(factor) and factor.raw is not None
    stored, code = factor.raw()
    return bits.as_values(stored, code).reshape(factor.shape), code


def computed(shape: tuple[int, ...], code: str, compute: Callable[[], numpy.ndarray]) -> LazyTensor:
    """A tensor `compute` forms with numpy each time it is read (of safetensors dtype `code`,
    bfloat16 as uint16), nothing kept: the torch-free engine reads a module's factors when it
    gets to the module and drops them after it, so memory does not grow with the adapter."""

    def load() -> torch.Tensor:
        import torch

        from loramerge.io.safetensors_header import torch_dtype

        return torch.from_numpy(compute()).view(torch_dtype(code))

    return LazyTensor(shape, code, load, raw=lambda: (compute(), code))
