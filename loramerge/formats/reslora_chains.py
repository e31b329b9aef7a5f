"""ResLoRA blocks and the chains they form: each block is linked to the same module in the
previous layer, where the shapes agree (docs/rules.md section 4)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge.adapter import LazyTensor
from loramerge.errors import FormatError


@dataclass
class ResLoraBlock:
    """One ResLoRA linear: its path in the base and its LoRAs [(B_i, A_i)], which sum."""

    path: str
    layer: int | None
    loras: list[tuple[LazyTensor, LazyTensor]]

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the update."""
        return self.loras[0][0].shape[0], self.loras[0][1].shape[1]

    @property
    def rank(self) -> int:
        return sum(a.shape[0] for _, a in self.loras)

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with B = [B_0, B_1, ...] and A = [A_0; A_1; ...]: B A = sum_i B_i A_i exactly.

        Stacking keeps every LoRA's own middle slots, so each training-time forward of
        docs/rules.md section 4 with summed LoRAs is the same forward on the stacked pair. The
        stored tensors are read, not kept: a conversion forms each block when it needs it.
        """
        bs = [b.read().to(dtype) for b, _ in self.loras]
        As = [a.read().to(dtype) for _, a in self.loras]
        return torch.cat(bs, dim=1), torch.cat(As, dim=0)


@dataclass
class ResLoraChain:
    """Blocks linked to their predecessor: block n's previous block is blocks[n - 1]."""

    name: str
    blocks: list[ResLoraBlock]


def layer_of(module_path: str) -> int | None:
    """The layer number in a module path, where it has exactly one number."""
    numbers = [int(part) for part in module_path.split(".") if part.isdigit()]
    return numbers[0] if len(numbers) == 1 else None


def natural_order(module_path: str) -> tuple:
    """Natural order (layers.10 after layers.9): the order the model's modules run in."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in module_path.split("."))


def link_chains(blocks: list[ResLoraBlock], path: Path) -> list[ResLoraChain]:
    """Blocks grouped by module name in layer order, linked only where the shapes match."""
    groups: dict[str, list[ResLoraBlock]] = {}
    for block in sorted(blocks, key=lambda b: natural_order(b.path)):
        groups.setdefault(block.name, []).append(block)
    chains = []
    for name, members in sorted(groups.items()):
        _check_no_gap(name, members, path)
        current: list[ResLoraBlock] = []
        for block in members:
            if current and current[-1].shape != block.shape:
                chains.append(ResLoraChain(_chain_name(name, chains), current))
                current = []
            current.append(block)
        chains.append(ResLoraChain(_chain_name(name, chains), current))
    return chains


def _chain_name(name: str, chains: list[ResLoraChain]) -> str:
    taken = sum(1 for chain in chains if chain.name.split("#")[0] == name)
    return name if taken == 0 else f"{name}#{taken + 1}"


def _check_no_gap(name: str, members: list[ResLoraBlock], path: Path) -> None:
    """Paths that differ only in their layer number must cover consecutive layers."""
    skeletons = {re.sub(r"\.\d+(?=\.|$)", ".#", b.path) for b in members}
    layers = [b.layer for b in members]
    if len(skeletons) != 1 or any(layer is None for layer in layers):
        return
    for before, after in itertools.pairwise(members):
        assert before.layer is not None and after.layer is not None
        if after.layer != before.layer + 1:
            missing = before.path.replace(f".{before.layer}.", f".{before.layer + 1}.", 1)
            raise FormatError(
                f"has no block for {missing} between layers {before.layer} and {after.layer} "
                f"of the {name} chain",
                file=path,
                hint="a ResLoRA chain needs every layer's block; the checkpoint is incomplete",
            )
