"""PEFT tuners that add a dense, generally full-rank matrix to the weight (docs/rules.md
section 6), read as dense updates: FourierFT, SHiRA, C3A and RandLoRA (PEFT 0.21.2)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from loramerge.adapter import Adapter, LazyTensor
from loramerge.errors import FormatError
from loramerge.formats.common import require_rank
from loramerge.formats.peft_dense import _adapter, _float, _number, _update

if TYPE_CHECKING:
    from loramerge.formats.peft_tuner_context import TunerContext


def _fourierft(ctx: TunerContext) -> Adapter:
    ctx.load(("fourierft_spectrum",))
    seed = ctx.config.get("random_loc_seed", 777)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FormatError(
            f"random_loc_seed must be an integer, got {seed!r}: it places the frequencies",
            file=ctx.config_path,
        )
    scaling = _number(ctx, "scaling", 150.0)
    updates = {}
    for path, found in ctx.modules.items():
        (spectrum,) = ctx.need(path, found, "fourierft_spectrum")
        _float(ctx, path, "fourierft_spectrum", spectrum, 1)
        updates[path] = _update(
            ctx, path, "fourier", {"spectrum": spectrum},
            params={"seed": seed, "scaling": scaling, "frequencies": spectrum.shape[0]},
        )  # fmt: skip
    return _adapter(
        ctx,
        updates,
        f"W + Re(ifft2(S)) * {scaling:g}: S zero but for the spectrum at the first n positions "
        f"of torch.randperm(out * in) seeded with {seed} (random_loc_seed); sizes from the base",
    )


def _shira(ctx: TunerContext) -> Adapter:
    ctx.load(("shira_weight", "shira_indices"))
    updates = {}
    for path, found in ctx.modules.items():
        values, indices = ctx.need(path, found, "shira_weight", "shira_indices")
        _float(ctx, path, "shira_weight", values, 1)
        if tuple(indices.shape) != (2, values.shape[0]):
            raise FormatError(
                f"shira_indices {list(indices.shape)} are not (2, {values.shape[0]}): a row and "
                "a column for each value of shira_weight",
                file=ctx.weights,
                module=path,
            )
        tensors = {"values": values, "indices": indices}
        updates[path] = _update(ctx, path, "scatter", tensors, params={"scale": 1.0})
    return _adapter(
        ctx,
        updates,
        "W + D, D[shira_indices[0], shira_indices[1]] = shira_weight (scale 1, PEFT's default; "
        "the file stores none); sizes from the base",
    )


def _c3a(ctx: TunerContext) -> Adapter:
    ctx.load(("c3a_kernel",))
    updates = {}
    for path, found in ctx.modules.items():
        (kernel,) = ctx.need(path, found, "c3a_kernel")
        _float(ctx, path, "c3a_kernel", kernel, 3)
        rows, cols, size = kernel.shape
        updates[path] = _update(
            ctx, path, "circulant", {"kernel": kernel}, out_features=rows * size,
            in_features=cols * size,
        )  # fmt: skip
    return _adapter(
        ctx,
        updates,
        "W + D / in: block (m, n) of D the circulant matrix of c3a_kernel[m, n], "
        "D[m b + t, n b + j] = c3a_kernel[m, n, (j - t) mod b]",
    )


def _randlora(ctx: TunerContext) -> Adapter:
    ctx.load(("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"),
             shared=("randlora_A", "randlora_B"))  # fmt: skip
    bases_a, bases_b = ctx.shared_projections("randlora_A", "randlora_B")
    _float(ctx, "base_model.randlora_A", "randlora_A", bases_a, 3)
    _float(ctx, "base_model.randlora_B", "randlora_B", bases_b, 3)
    rank = require_rank(ctx.config.get("r", 32), "r", ctx.config_path)
    scale = _number(ctx, "randlora_alpha", 640) / rank
    if bases_a.shape[0] != rank or bases_b.shape[2] != rank:
        raise FormatError(
            f"randlora_A {list(bases_a.shape)} and randlora_B {list(bases_b.shape)} are not "
            f"bases of the configured rank {rank}",
            file=ctx.weights,
        )
    updates = {}
    for path, found in ctx.modules.items():
        lam, gamma = ctx.need(path, found, "randlora_lambda", "randlora_gamma")
        _check_randlora(ctx, path, lam, gamma, bases_a, bases_b, found)
        tensors = {"A": bases_a, "B": bases_b, "lambda": lam, "gamma": gamma}
        params = {"scale": scale, "min_features": gamma.shape[1], "max_features": bases_b.shape[0]}
        own = math.prod(lam.shape) + math.prod(gamma.shape)  # the bases are shared
        updates[path] = _update(ctx, path, "randlora", tensors, params=params, stored=own)
    return _adapter(
        ctx,
        updates,
        f"W + {scale:g} B' A' (randlora_alpha / r): A' = lambda * A[:, :k, :min(out, in)] * gamma, "
        "B' = B[:max(out, in), :k], transposed when out < in; sizes from the base",
    )


def _check_randlora(
    ctx: TunerContext,
    path: str,
    lam: LazyTensor,
    gamma: LazyTensor,
    bases_a: LazyTensor,
    bases_b: LazyTensor,
    found: dict[str, LazyTensor],
) -> None:
    """lambda (r, k) and gamma (k, min(out, in)) with k = ceil(min / r) bases, within the
    shared ones; a module's own copies of the bases (PEFT saves them too) must match them."""
    _float(ctx, path, "randlora_lambda", lam, 2)
    _float(ctx, path, "randlora_gamma", gamma, 2)
    rank, count = bases_a.shape[0], lam.shape[1] if len(lam.shape) == 2 else -1
    smaller = gamma.shape[1]
    copies = [
        found[n].shape == s.shape
        for n, s in (("randlora_A", bases_a), ("randlora_B", bases_b))
        if n in found
    ]
    if (
        lam.shape != (rank, count)
        or gamma.shape[0] != count
        or count != -(-smaller // rank)
        or count > bases_b.shape[1]
        or bases_a.shape[1] not in (1, bases_b.shape[1])
        or smaller > bases_a.shape[2]
        or not all(copies)
    ):
        raise FormatError(
            f"randlora_lambda {list(lam.shape)} and randlora_gamma {list(gamma.shape)} do not "
            f"fit the shared bases {list(bases_a.shape)} / {list(bases_b.shape)}",
            file=ctx.weights,
            module=path,
        )


READERS = {"FOURIERFT": _fourierft, "SHIRA": _shira, "C3A": _c3a, "RANDLORA": _randlora}
