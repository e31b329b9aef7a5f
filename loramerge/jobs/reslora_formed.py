"""A converted ResLoRA checkpoint's plain factors, formed from the checkpoint when they are read.

A conversion keeps each block's `BlockForm` (numbers only) and the checkpoint's lazy tensors;
the merge engine reads a module's factors when it reaches the module and drops them after it.
So `reslora --merge` holds neither the plain adapter (which stacking makes larger than the
checkpoint) nor the checkpoint's factors in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramerge.adapter import LazyTensor
from loramerge.formats.reslora_chains import ResLoraChain
from loramerge.formats.reslora_config import ResLoraConfig
from loramerge.lazy_tensor import RecentValues
from loramerge.ops.reslora_forms import Factors, PlainFactors, plain_factors
from loramerge.ops.reslora_rules import PlainBlock


class ChainFactors(Sequence[Factors]):
    """A chain's (B_n, A_n) in float64, read from the checkpoint when indexed; the last one is
    kept (a weight-based rule reads block n for its base products, then for its norm)."""

    def __init__(self, chain: ResLoraChain) -> None:
        self.chain = chain
        self._recent = RecentValues(size=1)

    def __len__(self) -> int:
        return len(self.chain.blocks)

    def __getitem__(self, n: int) -> Factors:  # type: ignore[override]
        return self._recent.get(n, lambda: self.chain.blocks[n].factors(torch.float64))


class FormedFactors:
    """Lazy tensors of the plain factors, written as `plain_factors` turns a form's factors
    (reduced to `rank`, or padded to `pad_to`)."""

    def __init__(
        self, config: ResLoraConfig, *, rank: int | None = None, pad_to: int | None = None
    ) -> None:
        self.config, self.rank, self.pad_to = config, rank, pad_to
        self._recent = RecentValues()

    def lazy(
        self, chain: ResLoraChain, plain: PlainBlock, part: str, shape: tuple[int, int]
    ) -> LazyTensor:
        """Factor `part` ("A" or "B") of the chain's block that `plain` merged, of `shape`."""
        return LazyTensor(shape, torch.float32, lambda: getattr(self.formed(chain, plain), part))

    def formed(self, chain: ResLoraChain, plain: PlainBlock) -> PlainFactors:
        key = (chain.name, plain.form.stacked[0])
        return self._recent.get(key, lambda: self._form(chain, plain))

    def _form(self, chain: ResLoraChain, plain: PlainBlock) -> PlainFactors:
        factors = plain.form.factors(ChainFactors(chain))
        config = self.config
        return plain_factors(
            factors, plain.scale, config.lora_alpha, config.rank, rank=self.rank, pad_to=self.pad_to
        )
