"""The part of the base an initialisation moved into the adapter (docs/rules.md section 1).

PiSSA, OLoRA and KaSA adapters saved without PEFT's conversion apply to a residual base that
PEFT rebuilds from the original one when it loads them: W_res = W - s * B0 @ A0. These
functions compute (B0, A0) from the original weight exactly as PEFT does (float32, the same
decompositions), so that the adapter can be rewritten as [B | -B0] @ [A ; A0] on the original
base. All take W as (out x in) float32.
"""

from __future__ import annotations

import torch

Factors = tuple[torch.Tensor, torch.Tensor]


def pissa_factors(weight: torch.Tensor, rank: int, scale: float) -> Factors:
    """PiSSA: the top `rank` singular triplets, split as sqrt(S / s) on each side."""
    left, values, right = torch.linalg.svd(weight, full_matrices=False)
    kept = values[:rank] / scale
    root = torch.diag(torch.sqrt(kept))
    return left[:, :rank] @ root, root @ right[:rank]


def olora_factors(weight: torch.Tensor, rank: int) -> Factors:
    """OLoRA: the first `rank` columns of Q and rows of R of W's QR decomposition."""
    q, r = torch.linalg.qr(weight)
    return q[:, :rank].contiguous(), r[:rank].contiguous()


def kasa_factors(weight: torch.Tensor, rank: int, scale: float) -> Factors:
    """KaSA: the `rank` smallest singular components, which PEFT drops from the base, as
    s * B0 @ A0 (B0 = U S / s, A0 = V^T of those components)."""
    left, values, right = torch.linalg.svd(weight, full_matrices=False)
    keep = values.shape[0] - rank
    return left[:, keep:] * (values[keep:] / scale), right[keep:]


def residual_form(
    lora_b: torch.Tensor, lora_a: torch.Tensor, initial_b: torch.Tensor, initial_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B | -B0], [A ; A0]: with the module's scale, s (B A - B0 A0), the trained update on the
    residual base expressed on the original one."""
    return torch.cat([lora_b, -initial_b], dim=1), torch.cat([lora_a, initial_a], dim=0)
