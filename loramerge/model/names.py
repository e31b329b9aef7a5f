"""Matching adapter module paths to base tensor names, and the embedding/lm_head names."""

from __future__ import annotations

from collections.abc import Collection

INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)
OUTPUT_EMBEDDING_NAMES = ("lm_head.weight",)


def _normalise(name: str) -> str:
    return name.replace(".", "_")


def resolve_tensor_name(name: str, names: Collection[str]) -> str | None:
    """The base tensor that `name` (e.g. `model.layers.0.q_proj.weight`) refers to.

    Adapters and bases often disagree on a leading prefix (`transformer.` in PEFT paths of
    GPT-2, none in the original hub files) and kohya names use underscores: try the exact name,
    then with leading components dropped, then a unique suffix match, then underscore-normal form.
    """
    if name in names:
        return name
    parts = name.split(".")
    for start in range(1, len(parts) - 1):
        candidate = ".".join(parts[start:])
        if candidate in names:
            return candidate
    suffix_hits = [n for n in names if n.endswith("." + name)]
    if len(suffix_hits) == 1:
        return suffix_hits[0]
    wanted = _normalise(name)
    normal_hits = [
        n for n in names if _normalise(n) == wanted or _normalise(n).endswith("_" + wanted)
    ]
    if len(normal_hits) == 1:
        return normal_hits[0]
    for start in range(1, len(parts) - 1):
        tail = _normalise(".".join(parts[start:]))
        hits = [n for n in names if _normalise(n) == tail]
        if len(hits) == 1:
            return hits[0]
    return None


def input_embedding_name(names: Collection[str]) -> str | None:
    hits = sorted(n for n in names if n.endswith(INPUT_EMBEDDING_SUFFIXES))
    return hits[0] if len(hits) == 1 else None


def output_embedding_name(names: Collection[str]) -> str:
    for name in OUTPUT_EMBEDDING_NAMES:
        if name in names:
            return name
    return OUTPUT_EMBEDDING_NAMES[0]
