"""Lazy tensors computed from other tensors: the LoRA factors a reader derives from a tool's own
parameters (transposed, permuted, scaled, Kronecker or face-splitting products) are computed
when first used, like the factors read straight from a file."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from loramerge.adapter import LazyTensor
from loramerge.errors import located
from loramerge.formats.derived_factors import DerivedFactor
from loramerge.io.safetensors_header import torch_dtype

if TYPE_CHECKING:
    import torch

# derived factors are products: kept in float32 whatever the source dtype (a safetensors code,
# so that this module loads without torch)
DTYPE = "F32"


def derived(
    compute: Callable[[], torch.Tensor],
    shape: tuple[int, ...],
    dtype: torch.dtype | str = DTYPE,
    *,
    path: object = None,
    module: str | None = None,
    merge_only: str | None = None,
) -> LazyTensor:
    """A LazyTensor whose value is `compute()` cast to `dtype` (errors name path and module).
    With `merge_only` (why the form has no useful LoRA), a float32 DerivedFactor that
    `convert` refuses unless a rank reduction is asked for (formats/derived_factors)."""

    def load() -> torch.Tensor:
        with located(str(path) if path is not None else None, module):
            return compute().to(_torch(dtype)).contiguous()

    if merge_only is not None:
        return DerivedFactor(shape, load, merge_only)
    return LazyTensor(shape, dtype, load)


def derived_pair(
    compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    b_shape: tuple[int, ...],
    a_shape: tuple[int, ...],
    dtype: torch.dtype | str = DTYPE,
    *,
    path: object = None,
    module: str | None = None,
    merge_only: str | None = None,
) -> tuple[LazyTensor, LazyTensor]:
    """(B, A) computed together by one call of `compute()`; the pair is held only until both
    halves have been taken once, so a streaming merge does not keep it. `merge_only` as for
    `derived`."""
    held: dict[int, torch.Tensor] = {}
    taken: set[int] = set()

    def part(index: int) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            if not held:
                with located(str(path) if path is not None else None, module):
                    b, a = compute()
                wanted = _torch(dtype)
                held.update({0: b.to(wanted).contiguous(), 1: a.to(wanted).contiguous()})
                taken.clear()
            value = held[index]
            taken.add(index)
            if len(taken) == 2:
                held.clear()
            return value

        return load

    if merge_only is not None:
        return DerivedFactor(b_shape, part(0), merge_only), DerivedFactor(
            a_shape, part(1), merge_only
        )
    return LazyTensor(b_shape, dtype, part(0)), LazyTensor(a_shape, dtype, part(1))


def transposed(tensor: LazyTensor) -> LazyTensor:
    """A 2-D lazy tensor transposed, in its own dtype."""
    rows, cols = tensor.shape
    return LazyTensor((cols, rows), tensor.dtype, lambda: tensor.read().T.contiguous())


def _torch(dtype: torch.dtype | str) -> torch.dtype:
    return torch_dtype(dtype) if isinstance(dtype, str) else dtype
