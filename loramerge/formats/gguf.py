"""llama.cpp LoRA GGUF files read back with the gguf package (written by `gguf_writer`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind
from loramerge.errors import FormatError, opt
from loramerge.formats.gguf_arch import (
    KEY_BASE,
    KEY_HEADS,
    KEY_KV_HEADS,
    KEY_NAMES,
    KEY_PATHS,
    KEY_PERMUTED,
    PERMUTED_ARCHS,
    attention_heads,
    unpermute_rows,
)

if TYPE_CHECKING:
    from loramerge.formats.registry import ReadOptions

MAGIC = b"GGUF"


def sniff(path: Path) -> bool:
    if not (path.is_file() and path.suffix == ".gguf"):
        return False
    with path.open("rb") as handle:
        return handle.read(4) == MAGIC


def read(path: Path, options: ReadOptions | None = None) -> Adapter:
    """A LoRA GGUF as an Adapter: names mapped back, q/k permutation undone, scales restored.

    The base model's config (`options.base_config`) gives the head counts and module names of
    files that other tools wrote."""
    base_config = options.base_config if options is not None else None
    fields, pairs = _read_file(path)
    arch = str(fields.get("general.architecture", ""))
    paths = _module_paths(fields, arch, list(pairs), base_config, path)
    permuted = bool(fields.get(KEY_PERMUTED, PERMUTED_ARCHS.get(arch, False)))
    heads = _read_heads(fields, base_config, path) if permuted else None
    alpha = fields.get("adapter.lora.alpha")
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0 <= alpha < math.inf):
        raise FormatError(f"adapter.lora.alpha is {alpha!r}, not a finite number", file=path)
    modules = {}
    for stem, parts in pairs.items():
        module = _module(stem, parts, paths[stem], heads, alpha, path)
        modules[module.path] = module
    if not modules:
        raise FormatError("holds no LoRA tensors", file=path)
    return Adapter(
        modules=modules,
        base_model=fields.get(KEY_BASE),
        source_format="gguf",
        source_path=str(path),
        metadata={k: str(v) for k, v in fields.items() if isinstance(v, (str, int, float))},
    )


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The file's fields, and its LoRA tensors as float32 pairs by tensor stem."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()}
        raw = [(t.name, int(t.tensor_type), t.data) for t in reader.tensors]
    except Exception as exc:  # the gguf package raises many kinds of errors on a damaged file
        raise FormatError(
            f"is not a readable GGUF file ({type(exc).__name__}: {exc})", file=path
        ) from None
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise FormatError(
            "is a GGUF file but not a LoRA adapter (general.type / adapter.type)", file=path
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor_type, data in raw:
        stem, _, part = name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            continue  # e.g. norm vectors from mergekit adapters, which llama.cpp also skips
        if tensor_type not in (0, 1) or data.ndim != 2:  # F32, F16
            raise FormatError(f"tensor {name} is not a 2-D F32 or F16 matrix", file=path)
        pairs.setdefault(stem, {})[part] = torch.from_numpy(data.copy()).float()
    return fields, pairs


def _module(
    stem: str,
    parts: dict[str, torch.Tensor],
    module_path: str,
    heads: tuple[int, int] | None,
    alpha: float | None,
    path: Path,
) -> LoraModule:
    """One module from its GGUF tensor pair: embedding A transposed back, q/k rows unpermuted."""
    if set(parts) != {"lora_a", "lora_b"}:
        raise FormatError(f"tensor pair {stem} is missing one component", file=path)
    lora_a, lora_b = parts["lora_a"], parts["lora_b"]
    embedding = stem == "token_embd.weight"
    if embedding:
        lora_a = lora_a.T.contiguous()
    if lora_a.shape[0] != lora_b.shape[1] or lora_a.shape[0] == 0:
        raise FormatError(
            f"lora_a {list(lora_a.shape)} and lora_b {list(lora_b.shape)} of {stem} are not "
            "LoRA factors",
            file=path,
        )
    if heads is not None and stem.endswith((".attn_q.weight", ".attn_k.weight")):
        count = heads[0] if stem.endswith(".attn_q.weight") else heads[1]
        if lora_b.shape[0] % (2 * count):
            raise FormatError(
                f"{stem}.lora_b has {lora_b.shape[0]} rows, not a multiple of 2 x {count} heads",
                file=path,
            )
        lora_b = unpermute_rows(lora_b, count)
    return LoraModule(
        path=module_path,
        lora_A=LazyTensor.of(lora_a),
        lora_B=LazyTensor.of(lora_b),
        alpha=float(alpha) if alpha else float(lora_a.shape[0]),
        kind=ModuleKind.EMBEDDING if embedding else ModuleKind.LINEAR,
    )


def _read_heads(
    fields: Mapping[str, Any], base_config: Mapping[str, Any] | None, path: Path
) -> tuple[int, int] | None:
    if KEY_HEADS in fields:
        heads, kv_heads = fields.get(KEY_HEADS), fields.get(KEY_KV_HEADS)
        if not all(isinstance(n, int) and n > 0 for n in (heads, kv_heads)):
            raise FormatError(f"{KEY_HEADS} / {KEY_KV_HEADS} must be positive integers", file=path)
        return heads, kv_heads
    if base_config:
        return attention_heads(base_config)
    return None


def _module_paths(
    fields: Mapping[str, Any],
    arch: str,
    stems: list[str],
    base_config: Mapping[str, Any] | None,
    path: Path,
) -> dict[str, str]:
    """GGUF tensor stem -> module path: our own metadata, else gguf's name map reversed."""
    names, paths = fields.get(KEY_NAMES), fields.get(KEY_PATHS)
    if isinstance(names, list) and isinstance(paths, list) and len(names) == len(paths):
        mapping = dict(zip(names, paths, strict=True))
        if all(stem in mapping for stem in stems) and len(set(paths)) == len(paths):
            return mapping
    needs_heads = PERMUTED_ARCHS.get(arch, False) and any(
        s.endswith((".attn_q.weight", ".attn_k.weight")) for s in stems
    )
    if needs_heads and KEY_HEADS not in fields and not base_config:
        raise FormatError(
            "was not written by loramerge and its q/k rows are permuted",
            file=path,
            hint=f"pass {opt('base')} so that the head counts can undo the permutation",
        )
    import gguf

    member = next((m for m, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)
    if member is None:
        raise FormatError(f"has architecture {arch!r}, which gguf does not know", file=path)
    blocks = 1 + max([int(p) for s in stems for p in s.split(".")[1:2] if p.isdigit()] + [0])
    reverse: dict[str, list[str]] = {}
    for hf_name, (_, gguf_name) in gguf.get_tensor_name_map(member, blocks).mapping.items():
        reverse.setdefault(gguf_name, []).append(hf_name)
    mapping = {}
    for stem in stems:
        candidates = reverse.get(stem.removesuffix(".weight"), [])
        # prefer the transformers LLaMA-family spelling of the module path
        preferred = [c for c in candidates if c.startswith("model.") or c == "lm_head"]
        if not candidates:
            raise FormatError(f"tensor {stem} has no known module name", file=path)
        mapping[stem] = (preferred or candidates)[0]
    return mapping
