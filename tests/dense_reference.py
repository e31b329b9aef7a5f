"""Float64 evaluations of the dense rules (docs/rules.md section 6), written from PEFT 0.21.2's
definitions for the tests, independently of loramerge's ops: whole matrices, no tiles, and
where PEFT goes through an FFT, the FFT definition itself.

Every function takes W as the (out x in) float64 matrix the layer multiplies and returns W'.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def skew(vector: torch.Tensor, size: int) -> torch.Tensor:
    """One skew matrix from its strict upper triangle, row by row."""
    q = torch.zeros(size, size, dtype=F64)
    k = 0
    for i in range(size):
        for j in range(i + 1, size):
            q[i, j] = vector[k]
            q[j, i] = -vector[k]
            k += 1
    return q


def neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT 0.21.2's _cayley_batch series, as its loop adds the powers of Q."""
    eye = torch.eye(q.shape[0], dtype=F64)
    if terms <= 1:
        return eye
    if terms == 2:
        return eye + 2 * q
    doubled = max(2, terms - 2)  # the loop adds Q^2 .. Q^(terms - 2) doubled, at least Q^2
    total = eye + sum(2 * torch.linalg.matrix_power(q, k) for k in range(1, doubled + 1))
    return total + torch.linalg.matrix_power(q, doubled + 1)


def cayley(q: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(q.shape[0], dtype=F64)
    return (eye - q) @ torch.linalg.inv(eye + q)


def oft(
    weight: torch.Tensor,
    oft_r: torch.Tensor,
    terms: int | None,
    coft_eps: float | None = None,
    blocks: int | None = None,
) -> torch.Tensor:
    size = (1 + math.isqrt(1 + 8 * oft_r.shape[1])) // 2
    rotations = []
    for vector in oft_r.to(F64):
        q = skew(vector, size)
        if coft_eps is not None:
            limit = coft_eps / math.sqrt(oft_r.shape[0])
            norm = float(torch.linalg.matrix_norm(q))
            q = q if norm <= limit else q * (limit / norm)
        rotations.append(cayley(q) if terms is None else neumann(q, terms))
    if len(rotations) == 1:
        rotations = rotations * (blocks or 1)
    return weight @ torch.block_diag(*rotations).T


def boft(
    weight: torch.Tensor, boft_r: torch.Tensor, boft_s: torch.Tensor, permutations=None
) -> torch.Tensor:
    """(W M^T) * s, M = B_(N-1) ... B_0, B_f = P_f blockdiag(cayley(skew part)) P_f^T."""
    n = weight.shape[1]
    total = torch.eye(n, dtype=F64)
    for f, factor in enumerate(boft_r.to(F64)):
        blocks = [cayley(0.5 * (m - m.T)) for m in factor]
        p = torch.eye(n, dtype=F64)
        if permutations is not None:
            p = torch.zeros(n, n, dtype=F64)
            p[torch.arange(n), permutations[f]] = 1
        total = p @ torch.block_diag(*blocks) @ p.T @ total
    return (weight @ total.T) * boft_s.to(F64).reshape(-1, 1)


def hra(weight: torch.Tensor, hra_u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    u = hra_u.to(F64)
    eye = torch.eye(u.shape[0], dtype=F64)
    if apply_gs:
        q, _ = torch.linalg.qr(u)  # Gram-Schmidt up to signs, which I - 2 Q Q^T ignores
        return weight @ (eye - 2 * q @ q.T)
    product = eye
    for i in range(u.shape[1]):
        v = u[:, i : i + 1]
        product = product @ (eye - 2 * v @ v.T / (v.T @ v))
    return weight @ product


def miss_bat(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    m = blocks.to(F64)
    r = m.shape[-1]
    out = weight.clone()
    for i in range(weight.shape[0] // r):
        for j in range(weight.shape[1] // r):
            w = weight[i * r : (i + 1) * r, j * r : (j + 1) * r]
            out[i * r : (i + 1) * r, j * r : (j + 1) * r] = w + w @ m[i] + m[i]
    return out


def fourier(weight: torch.Tensor, spectrum: torch.Tensor, seed: int, scaling: float):
    out_f, in_f = weight.shape
    n = spectrum.numel()
    flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(seed))[:n]
    dense = torch.zeros(out_f, in_f, dtype=torch.complex128)
    dense[flat // in_f, flat % in_f] = spectrum.to(torch.complex128)
    return weight + torch.fft.ifft2(dense).real * scaling


def scatter(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = weight.clone()
    for (row, col), value in zip(indices.long().T.tolist(), values.to(F64).tolist(), strict=True):
        out[row, col] += value
    return out


def circulant(weight: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """C3A: y_m = sum_n fft(ifft(x_n) * fft(w_mn)).real / in, column by column."""
    k = kernel.to(F64)
    _, blocks_in, b = k.shape
    columns = []
    for j in range(blocks_in * b):
        x = torch.zeros(blocks_in, b, dtype=torch.complex128)
        x[j // b, j % b] = 1
        y = torch.einsum("nb,mnb->mb", torch.fft.ifft(x), torch.fft.fft(k))
        columns.append(torch.fft.fft(y).real.reshape(-1))
    return weight + torch.stack(columns, dim=1) / weight.shape[1]


def randlora(weight, bases_a, bases_b, lam, gamma, scale: float) -> torch.Tensor:
    """PEFT's get_scaled_bases and get_delta_weight, in float64."""
    out_f, in_f = weight.shape
    small, large = min(out_f, in_f), max(out_f, in_f)
    k = lam.shape[1]
    a = bases_a.to(F64)[:, :k, :small]
    b = bases_b.to(F64)[:large, :k, :]
    update_b = b.flatten(start_dim=1)
    update_a = (lam.to(F64)[:, :, None] * a * gamma.to(F64)[None]).flatten(end_dim=1)
    if small == in_f:
        first, second = update_a, update_b
    else:
        first, second = update_b.T, update_a.T
    return weight + (first.T @ second.T).T * scale


def ia3(weight: torch.Tensor, scale: torch.Tensor, feedforward: bool) -> torch.Tensor:
    values = scale.to(F64).reshape(-1)
    return weight * (values.reshape(1, -1) if feedforward else values.reshape(-1, 1))


def round_once(values: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """float64 rounded to the nearest value of a 16-bit float dtype directly (ties to even), where
    torch's conversion rounds to float32 first: the two differ only where the float32 rounding
    lands exactly on a midpoint between two values of `dtype`."""
    bits = values.to(dtype).view(torch.int16).to(torch.int32)
    candidates = torch.stack([bits - 1, bits, bits + 1])
    decoded = candidates.to(torch.int16).view(dtype).to(F64)
    distance = (decoded - values).abs().nan_to_num(math.inf)
    best = distance == distance.min(dim=0).values
    # 0: nearest and even, 1: nearest and odd, 2 and 3: farther
    score = (~best).to(torch.int32) * 2 + candidates % 2
    pick = score.argmin(dim=0, keepdim=True)
    return candidates.gather(0, pick)[0].to(torch.int16).view(dtype)
