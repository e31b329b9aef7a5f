"""Choosing a rank from a spectrum: the numerical rank, and the smallest rank that keeps a share
of an update's energy (docs/rules.md section 3)."""

from __future__ import annotations

import torch

from loramerge.errors import OptionError


def numerical_rank(singular_values: torch.Tensor, rtol: float | None = None) -> int:
    """Number of singular values above rtol * max(singular_values).

    The default rtol, 16 * n * eps(dtype of the values) with n their count, sits well above the
    round-off of the QR core (about eps * S_0) and far below any energy that matters.
    """
    values = _check_singular_values(singular_values)
    if values.numel() == 0:
        return 0
    if rtol is None:
        rtol = 16 * values.numel() * torch.finfo(singular_values.dtype).eps
    top = float(values.max())
    return int((values > rtol * top).sum()) if top > 0 else 0


def rank_for_energy(
    singular_values: torch.Tensor,
    threshold: float,
    max_rank: int | None = None,
    *,
    rtol: float | None = None,
) -> int:
    """Smallest k with sum_{i<k} S_i^2 / sum S_i^2 >= threshold, capped at max_rank, at least 1.

    `singular_values` is 1-D in any order and floating dtype; 0 < threshold <= 1. Energy sums
    are compared with a relative slack of a few ulps per term so that round-off never pushes k
    up, and k never exceeds the numerical rank (see `numerical_rank`, which `rtol` is passed
    to): threshold 1.0 returns exactly the numerical rank. A zero spectrum gives 1.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise OptionError(f"energy threshold must be a number in (0, 1], got {threshold!r}")
    if not 0.0 < threshold <= 1.0:
        raise OptionError(f"energy threshold must be in (0, 1], got {threshold!r}")
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1
    ):
        raise OptionError(f"maximum rank must be an integer >= 1, got {max_rank!r}")
    n_rank = numerical_rank(singular_values, rtol)
    if n_rank == 0:
        return 1
    values = torch.sort(_check_singular_values(singular_values), descending=True).values
    values = values / values[0]  # normalised so that squaring can neither overflow nor underflow
    if threshold == 1.0:
        k = n_rank
    else:
        cumulative = torch.cumsum(values[:n_rank] ** 2, dim=0)
        total = float((values**2).sum())
        slack = 4 * (values.numel() + 1) * torch.finfo(torch.float64).eps
        reached = cumulative >= threshold * total * (1.0 - slack)
        # reached[-1] holds up to round-off, which the slack absorbs; fall back to n_rank anyway.
        k = int(torch.nonzero(reached)[0]) + 1 if bool(reached.any()) else n_rank
    if max_rank is not None:
        k = min(k, max_rank)
    return max(k, 1)


def _check_singular_values(values: torch.Tensor) -> torch.Tensor:
    if values.ndim != 1 or not values.is_floating_point():
        raise OptionError(
            f"singular values must be a 1-D floating tensor, got {values.dtype} "
            f"of shape {tuple(values.shape)}"
        )
    values = values.to(torch.float64)
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise OptionError("singular values must be finite and non-negative")
    return values
