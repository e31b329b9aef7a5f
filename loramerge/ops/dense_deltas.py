"""The added matrices D of the dense rules W' = W + D (docs/rules.md section 6), in float64,
block by block: `*_prepare(tensors, params, shape)` once per weight, then `*_rows(prepared,
rows, cols)` gives D[rows[0]:rows[1], cols[0]:cols[1]]. `shape` is W's (out, in)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

F64 = torch.float64
Span = tuple[int, int]
Tensors = Mapping[str, torch.Tensor]
# complex128 bytes of one column chunk of the inverse FFT along the outputs
FFT_CHUNK_BYTES = 8 << 20


def _spans(rows: Span, cols: Span) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices as a column, column indices as a row: broadcast they index the block."""
    return torch.arange(*rows).reshape(-1, 1), torch.arange(*cols).reshape(1, -1)


def dense_rows(delta: torch.Tensor, rows: Span, cols: Span) -> torch.Tensor:
    return delta[rows[0] : rows[1], cols[0] : cols[1]]


# ---------------------------------------------------------------- FourierFT


def fourier_positions(
    out_features: int, in_features: int, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of FourierFT's `count` frequencies: the first `count` entries of a random
    permutation of the out * in positions (row-major) drawn by torch.randperm from a CPU
    generator seeded with `seed` (PEFT's `random_loc_seed`)."""
    generator = torch.Generator().manual_seed(int(seed))
    flat = torch.randperm(out_features * in_features, generator=generator)[:count]
    return flat // in_features, flat % in_features


def fourier_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    """D = Re(ifft2(S)) * scaling, S zero but for the spectrum at its positions.

    The inverse FFT mixes every row, so D is formed whole (out x in float64, once per weight):
    first along the inputs for the rows that hold a frequency, then along the outputs one
    chunk of columns at a time, which keeps the complex intermediates small."""
    out_features, in_features = shape
    spectrum = tensors["spectrum"].to(F64).reshape(-1)
    rows, cols = fourier_positions(out_features, in_features, spectrum.numel(), params["seed"])
    used, where = torch.unique(rows, return_inverse=True)
    partial = torch.zeros(used.numel(), in_features, dtype=torch.complex128)
    partial[where, cols] = spectrum.to(torch.complex128)
    partial = torch.fft.ifft(partial, dim=1)
    delta = torch.empty(out_features, in_features, dtype=F64)
    width = max(1, FFT_CHUNK_BYTES // (16 * out_features))
    for start in range(0, in_features, width):
        stop = min(in_features, start + width)
        chunk = torch.zeros(out_features, stop - start, dtype=torch.complex128)
        chunk[used] = partial[:, start:stop]
        delta[:, start:stop] = torch.fft.ifft(chunk, dim=0).real
    return delta.mul_(float(params["scaling"]))


# ---------------------------------------------------------------- SHiRA


def scatter_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    """The sparse entries sorted by row: (rows, columns, values * scale)."""
    indices = tensors["indices"]
    rows, cols = indices[0].long(), indices[1].long()
    values = tensors["values"].to(F64).reshape(-1) * float(params.get("scale", 1.0))
    order = torch.argsort(rows, stable=True)
    return rows[order], cols[order], values[order]


def scatter_apply(block: torch.Tensor, prepared: Any, rows: Span, cols: Span) -> torch.Tensor:
    """The block plus the entries that fall in it (repeated positions add up)."""
    all_rows, all_cols, values = prepared
    low = int(torch.searchsorted(all_rows, rows[0]))
    high = int(torch.searchsorted(all_rows, rows[1]))
    r, c, v = all_rows[low:high], all_cols[low:high], values[low:high]
    keep = (c >= cols[0]) & (c < cols[1])
    return block.index_put_((r[keep] - rows[0], c[keep] - cols[0]), v[keep], accumulate=True)


# ---------------------------------------------------------------- C3A


def circulant_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    """The kernel (out/b, in/b, b) divided by the layer's input size, as PEFT scales it."""
    return tensors["kernel"].to(F64) / shape[1]


def circulant_rows(kernel: torch.Tensor, rows: Span, cols: Span) -> torch.Tensor:
    """D[m b + t, n b + j] = k[m, n, (j - t) mod b]: block (m, n) is the circulant matrix of
    its kernel row, each row the previous one shifted right by one."""
    size = kernel.shape[-1]
    t, j = _spans(rows, cols)
    return kernel[t // size, j // size, (j - t) % size]


# ---------------------------------------------------------------- RandLoRA


def randlora_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    """(L, R, s) with D = s L R, from the shared bases sliced to the layer and the trained
    scales: with m = min(out, in), n = max(out, in) and k bases of rank r,
    A' = lambda[:, :, None] * A[:, :k, :m] * gamma[None] (r, k, m) flattened to (r k x m) and
    B' = B[:n, :k, :] (n, k, r) flattened to (n x k r) (the two flattenings pair the indices
    differently, as PEFT's do); D = B' A' when m is the input size, else (B' A')^T. PEFT
    saves one base A (r, 1, m) shared by the k bases: it broadcasts."""
    lam, gamma = tensors["lambda"].to(F64), tensors["gamma"].to(F64)
    rank, bases = lam.shape
    smaller, larger = min(shape), max(shape)
    a = tensors["A"][:, :bases, :smaller].to(F64)
    b = tensors["B"][:larger, :bases, :].to(F64)
    right = (lam[:, :, None] * a * gamma[None]).reshape(rank * bases, smaller)
    left = b.reshape(larger, bases * rank)
    scale = float(params["scale"])
    if smaller == shape[1]:
        return left, right, scale
    return right.T, left.T, scale


def product_rows(prepared: Any, rows: Span, cols: Span) -> torch.Tensor:
    left, right, scale = prepared
    return (left[rows[0] : rows[1]] @ right[:, cols[0] : cols[1]]).mul_(scale)


# ---------------------------------------------------------------- LoKr, LoHa (dense forms)


def kron_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    """(w1, w2 as a matrix, s); a conv's w2 (c, d, kh, kw) is (c x d kh kw)."""
    w2 = tensors["w2"].to(F64)
    return tensors["w1"].to(F64), w2.reshape(w2.shape[0], -1), float(params["scale"])


def kron_rows(prepared: Any, rows: Span, cols: Span) -> torch.Tensor:
    """kron(w1, w2) * s: entry (i c + k, j w + l) is w1[i, j] w2[k, l] s, w2 (c x w)."""
    w1, w2, scale = prepared
    height, width = w2.shape
    t, j = _spans(rows, cols)
    return (w1[t // height, j // width] * w2[t % height, j % width]).mul_(scale)


def hadamard_prepare(tensors: Tensors, params: Mapping[str, Any], shape: tuple[int, int]):
    names = ("b1", "a1", "b2", "a2")
    b1, a1, b2, a2 = (tensors[n].to(F64).reshape(tensors[n].shape[0], -1) for n in names)
    return b1, a1, b2, a2, float(params["scale"])


def hadamard_rows(prepared: Any, rows: Span, cols: Span) -> torch.Tensor:
    """((B1 A1) * (B2 A2)) * s."""
    b1, a1, b2, a2, scale = prepared
    r, c = slice(*rows), slice(*cols)
    return ((b1[r] @ a1[:, c]) * (b2[r] @ a2[:, c])).mul_(scale)
