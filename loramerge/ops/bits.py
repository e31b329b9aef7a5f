"""Float conversions as integer arithmetic on the stored bits, with numpy and without torch.

Widening bfloat16 or float16 to float32 is exact. Rounding float32 to bfloat16 to nearest, ties
to even, is an addition and a shift on the bits; NaN becomes 0xFFFF, which is what torch's
vectorised conversion writes on the CPUs it was checked on (its scalar code writes 0x7FC0), so
`loramerge.model.fast_checks` compares these functions with torch before they are trusted.
"""

from __future__ import annotations

import numpy

# safetensors codes these functions read and write, with their numpy storage type
WIDENED = {"F32": numpy.float32, "BF16": numpy.uint16, "F16": numpy.float16}
ROUNDED = ("F32", "BF16")
BF16_NAN = 0xFFFF


def widen_into(stored: numpy.ndarray, code: str, out: numpy.ndarray) -> numpy.ndarray:
    """`stored` (bytes or values of dtype `code`) as float32 in `out` (same element count)."""
    values = as_values(stored, code)
    if code == "BF16":
        bits = out.view(numpy.uint32)
        numpy.copyto(bits, values.reshape(bits.shape), casting="unsafe")
        numpy.left_shift(bits, 16, out=bits)
    else:
        numpy.copyto(out, values.reshape(out.shape), casting="unsafe")
    return out


def as_values(stored: numpy.ndarray, code: str) -> numpy.ndarray:
    """Stored bytes (uint8) seen as their dtype's storage type; other arrays as they are."""
    if stored.dtype == numpy.uint8:
        return stored.view(WIDENED[code])
    return stored


def round_into(
    values: numpy.ndarray, code: str, out: numpy.ndarray, scratch: numpy.ndarray
) -> numpy.ndarray:
    """float32 `values` rounded to `code` (BF16, or F32 unchanged) into `out`, a uint16 (or
    float32) array of as many elements; `scratch` is a uint32 array of as many elements.

    Round to nearest, ties to even, in integers: add 0x7FFF plus the lowest kept bit, keep the
    top 16 bits (five passes over the tile, measured about half the time of adding 0x8000 and
    then fixing the ties with a mask). NaN, whose bits the addition may carry into the sign, is
    written as BF16_NAN.
    """
    flat = values.reshape(-1)
    if code == "F32":
        numpy.copyto(out.view(numpy.float32).reshape(-1), flat)
        return out
    target = out.view(numpy.uint16).reshape(-1)
    if not flat.size:
        return out
    stored = flat.view(numpy.uint32)
    numpy.right_shift(stored, 16, out=scratch)
    numpy.bitwise_and(scratch, 1, out=scratch)
    scratch += 0x7FFF
    scratch += stored
    numpy.right_shift(scratch, 16, out=target, casting="unsafe")
    if numpy.isnan(flat.max()):  # max is NaN when any element is
        target[numpy.isnan(flat)] = BF16_NAN
    return out


def count_changed(after: numpy.ndarray, before: numpy.ndarray) -> int:
    """Elements whose stored bits differ (as integers: NaN equals itself when its bits do)."""
    return int(numpy.count_nonzero(after != before))


def nonfinite_count(stored: numpy.ndarray, code: str) -> int | None:
    """NaN and Inf elements of a float tensor's stored bytes; 0 for integer dtypes; None for
    dtypes this does not read (float8)."""
    if code in ("F64", "F32"):
        values = stored.view(numpy.float64 if code == "F64" else numpy.float32)
        return int(values.size - numpy.count_nonzero(numpy.isfinite(values)))
    if code in ("F16", "BF16"):
        exponent = 0x7C00 if code == "F16" else 0x7F80
        return int(numpy.count_nonzero((stored.view(numpy.uint16) & exponent) == exponent))
    if code.startswith("F8"):
        return None
    return 0
