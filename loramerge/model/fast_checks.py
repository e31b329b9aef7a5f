"""Whether the torch-free merge engine (loramerge.model.fast_stream) writes torch's bits here.

The torch-free engine computes every product with torch's own BLAS function (ops.torch_blas),
scales, adds and widens with numpy, and rounds to bfloat16 with integer arithmetic (ops.bits).
That gives the bits of torch's path only if torch's `mm`, `addmm_`, `mul_`, `add_` and dtype
conversions compute exactly that on this machine; so before the engine is used they are compared
with torch itself, on values whose sums cancel and round often (where another summation order
or rounding rule differs on a large share of elements), narrow and wide shapes, ranks 1 to 256,
and every special value a conversion treats apart (NaN payloads, infinities, subnormals, ties,
the overflow edge), at lengths that reach vector tails. The verdict depends only on the torch
build, numpy and the CPU, so it is kept in the user's cache folder under those (one torch import
per machine and torch version), like the architecture answers.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

import numpy

from loramerge.io import user_cache
from loramerge.model.architecture_cache import installed
from loramerge.ops import bits, fast_update, torch_blas

KIND = "fast-path"
FORMAT = 1
RANKS = (1, 2, 7, 16, 64, 256)
SHAPES = ((3, 512), (64, 2048), (300, 1000), (1024, 2048), (2048, 37))
SCALES = (0.7, 1 / 3, 2.0, 16 / 8**0.5)


def _cpu() -> str:
    """The CPU as the kernels see it: model and feature flags (Linux), else what Python says."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags"))][:2]
        return "".join(sorted(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _code() -> str:
    """A digest of the code whose arithmetic is checked: a change to it is checked anew."""
    digest = hashlib.sha256()
    for module in (bits, fast_update, torch_blas):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def verdict_key() -> dict[str, object]:
    path = torch_blas.library_path()
    return {
        "format": FORMAT,
        "code": _code(),
        "torch": installed("torch"),
        "numpy": numpy.__version__,
        "cpu": _cpu(),
        "library": [str(path), path.stat().st_size] if path else None,
    }


@functools.cache
def trusted() -> bool:
    """Whether the torch-free engine writes torch's bits on this machine (asked of torch once
    per machine and versions, then kept)."""
    if torch_blas.load() is None:
        return False
    key = verdict_key()
    found = user_cache.load(KIND, key)
    if isinstance(found, dict) and isinstance(found.get("same"), bool):
        return found["same"]
    same = products_match() and conversions_match()
    user_cache.store(KIND, key, {"same": same})
    return same


def _values(generator: numpy.random.Generator, shape: tuple[int, ...]) -> numpy.ndarray:
    return generator.standard_normal(shape).astype(numpy.float32)


def products_match() -> bool:
    """torch's mm, addmm_, mul_ and add_ against the torch-free products, with one and with
    torch's own number of threads."""
    import torch

    blas = torch_blas.load()
    assert blas is not None
    generator = numpy.random.default_rng(20261206)
    blas.set_threads(1)
    for rank in RANKS:
        for rows, columns in SHAPES:
            lora_b, lora_a = _values(generator, (rows, rank)), _values(generator, (rank, columns))
            base = _values(generator, (rows, columns)) * numpy.float32(rank**0.5)
            product = blas.addmm(numpy.empty((rows, columns), numpy.float32), lora_b, lora_a, 0.0)
            fused = blas.addmm(base.copy(), lora_b, lora_a, 1.0)
            b, a, w = (torch.from_numpy(x) for x in (lora_b, lora_a, base))
            for threads in sorted({1, torch.get_num_threads()}):
                with _torch_threads(torch, threads):
                    if not _same(torch.mm(b, a).numpy(), product):
                        return False
                    if not _same(w.clone().addmm_(b, a).numpy(), fused):
                        return False
            for scale in SCALES:
                scaled = product * numpy.float32(scale)
                if not _same(torch.from_numpy(product).mul(scale).numpy(), scaled):
                    return False
                if not _same((w + torch.from_numpy(scaled)).numpy(), base + scaled):
                    return False
    return True


class _torch_threads:
    def __init__(self, torch, count: int) -> None:
        self.torch, self.count = torch, count

    def __enter__(self) -> None:
        self.before = self.torch.get_num_threads()
        self.torch.set_num_threads(self.count)

    def __exit__(self, *exc: object) -> None:
        self.torch.set_num_threads(self.before)


def special_values(count: int = 4099) -> numpy.ndarray:
    """float32 values that conversions treat apart, among ordinary ones."""
    generator = numpy.random.default_rng(7)
    patterns = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFBFFFFF, 0x7FA12345, 0x7F800000,
                0xFF800000, 0x00000001, 0x807FFFFF, 0x00400000, 0x7F7FFFFF, 0x7F7F8000,
                0x7F7F7FFF, 0x3F808000, 0x3F818000, 0x3F808001, 0x00008000, 0x00018000,
                0x80000000, 0x00000000]  # fmt: skip
    found = generator.integers(0, 2**32, size=count, dtype=numpy.uint64).astype(numpy.uint32)
    found[: len(patterns) * 50] = numpy.repeat(numpy.array(patterns, numpy.uint32), 50)
    generator.shuffle(found)
    return found.view(numpy.float32)


def conversions_match() -> bool:
    """torch's float32 <-> bfloat16 conversions against ops.bits, at many lengths and offsets."""
    import torch

    values = special_values()
    for length in (1, 3, 15, 16, 17, 31, 33, 64, 255, 1000, 4098):
        for offset in (0, 1):
            part = values[offset : offset + length]
            rounded = numpy.empty(part.size, numpy.uint16)
            bits.round_into(part, "BF16", rounded, numpy.empty(part.size, numpy.uint32))
            target = torch.empty(part.size, dtype=torch.bfloat16)
            target.copy_(torch.from_numpy(part))
            if not _same(target.view(torch.int16).numpy().view(numpy.uint16), rounded):
                return False
            widened = bits.widen_into(rounded, "BF16", numpy.empty(part.size, numpy.float32))
            if not _same(target.to(torch.float32).numpy(), widened):
                return False
    return True


def _same(found: numpy.ndarray, expected: numpy.ndarray) -> bool:
    return found.tobytes() == expected.tobytes()
