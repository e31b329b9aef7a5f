"""Factor forms of PEFT LoRA variants that are ordinary LoRAs once expanded: BD-LoRA's
block-diagonal factors and KaSA's trained diagonal (docs/rules.md section 1)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramerge.adapter import LazyTensor
from loramerge.errors import FormatError

if TYPE_CHECKING:
    import torch


class BlockDiagonal:
    """BD-LoRA: PEFT stores a block-diagonal factor as its blocks stacked, (rows, cols / n);
    the full factor is block_diag of its n row chunks, which makes an ordinary LoRA."""

    def __init__(self, value: Any, config_path: Path) -> None:
        self.blocks = 0
        if not value:
            return
        if not isinstance(value, dict) or not isinstance(value.get("nblocks", 1), int):
            raise FormatError("use_bdlora must be a BD-LoRA config object", file=config_path)
        self.blocks = max(1, int(value.get("nblocks", 1)))
        self.on_a = [p for p in value.get("target_modules_bd_a") or [] if isinstance(p, str)]
        self.on_b = [p for p in value.get("target_modules_bd_b") or [] if isinstance(p, str)]
        self.path = config_path

    def expand(self, module: str, found: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
        if self.blocks == 0:
            return found
        # PEFT matches the patterns as substrings of the module's name
        part = "lora_A" if any(p in module for p in self.on_a) else None
        if part is None and any(p in module for p in self.on_b):
            part = "lora_B"
        if part is None or part not in found:
            return found
        stored = found[part]
        if len(stored.shape) != 2 or stored.shape[0] % self.blocks:
            raise FormatError(
                f"block-diagonal {part} {list(stored.shape)} does not split into "
                f"{self.blocks} blocks",
                file=self.path,
                module=module,
            )
        shape = (stored.shape[0], stored.shape[1] * self.blocks)
        blocks = self.blocks

        def load() -> torch.Tensor:
            import torch

            return torch.block_diag(*torch.chunk(stored.load(), blocks, dim=0))

        return {**found, part: LazyTensor(shape, stored.dtype, load)}


def scaled_columns(lora_b: LazyTensor, diag: LazyTensor, path: Path, module: str) -> LazyTensor:
    """KaSA's B diag(d), formed as PEFT forms it (B * d, elementwise in B's dtype)."""
    if len(lora_b.shape) != 2 or tuple(diag.shape) != (lora_b.shape[1],):
        raise FormatError(
            f"lora_diag {list(diag.shape)} does not fit lora_B {list(lora_b.shape)}",
            file=path,
            module=module,
        )

    def load() -> torch.Tensor:
        return lora_b.load() * diag.load().to(lora_b.dtype)

    return LazyTensor(lora_b.shape, lora_b.dtype, load)
