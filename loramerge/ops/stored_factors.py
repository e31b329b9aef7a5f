"""LoRA factors as numpy arrays, for the paths that run without torch: a factor stored as it is
in a file read as float32, and factors computed with numpy held as lazy tensors."""

from __future__ import annotations

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


def in_memory(values: numpy.ndarray, code: str) -> LazyTensor:
    """Values computed with numpy (of safetensors dtype `code`, bfloat16 as uint16) as a lazy
    tensor: read as they are by the torch-free engine, turned into a tensor sharing their memory
    where torch asks for it."""

    def load() -> torch.Tensor:
        import torch

        from loramerge.io.safetensors_header import torch_dtype

        return torch.from_numpy(values).view(torch_dtype(code))

    return LazyTensor(values.shape, code, load, raw=lambda: (values, code))
