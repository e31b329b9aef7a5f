"""The safetensors dtypes in one table: code, torch dtype name and bytes per element, and the
ones a merged model may be written in. Torch-free, so that the command line lists the choices
without loading torch."""

from __future__ import annotations

from loramerge.errors import UsageError

# safetensors dtype code -> (name of the torch dtype, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# What merged (and folded) tensors may be written as: name -> code, the default first
OUTPUT_DTYPES: dict[str, str] = {DTYPES[code][0]: code for code in ("F32", "F16", "BF16", "F64")}


def output_code(name: str | None, option: str = "dtype") -> str | None:
    """ "bfloat16" -> "BF16"; None keeps each tensor's dtype."""
    if name is None:
        return None
    try:
        return OUTPUT_DTYPES[name]
    except KeyError:
        raise UsageError(
            f"is not an output dtype; choose one of {', '.join(OUTPUT_DTYPES)}",
            option=option,
            value=name,
        ) from None
