"""llama.cpp LoRA GGUF files: written tensor by tensor with the gguf package, and read back."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loramerge import __version__
from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind, common_alpha
from loramerge.errors import FormatError, OptionError, opt
from loramerge.io.atomic import short_write_cause

if TYPE_CHECKING:
    from loramerge.formats.registry import ReadOptions

MAGIC = b"GGUF"
# Hugging Face architecture -> (gguf MODEL_ARCH member, q/k rows permuted). llama.cpp's
# convert_hf_to_gguf converts Llama and Mistral with LlamaModel (arch "llama"), which permutes
# the rows of q_proj / k_proj; Qwen2Model (arch "qwen2") keeps them as they are.
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
}
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# gguf architecture name -> whether llama.cpp's conversion permutes q/k rows
_PERMUTED_ARCHS = {"llama": True, "qwen2": False}
# Our own keys: llama.cpp ignores unknown keys; they let `verify` map tensors back exactly.
KEY_VERSION = "loramerge.version"
KEY_PATHS = "loramerge.module_paths"
KEY_NAMES = "loramerge.tensor_names"
KEY_HEADS = "loramerge.attention.head_count"
KEY_KV_HEADS = "loramerge.attention.head_count_kv"
KEY_PERMUTED = "loramerge.qk_permuted"
KEY_BASE = "loramerge.base_model"


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's LLaMA q/k permutation of the output rows (the two rotary halves of
    each head interleaved), applied to any tensor whose first axis is the output."""
    size = rows.shape[0]
    return (
        rows.reshape(heads, 2, size // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `permute_rows`."""
    size = rows.shape[0]
    return (
        rows.reshape(heads, size // heads // 2, 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def architecture(config: Mapping[str, Any]) -> tuple[str, bool]:
    """(gguf MODEL_ARCH member, q/k permuted) for a base config, or a clear refusal."""
    names = list(config.get("architectures") or [])
    if not names and config.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[config["model_type"]]]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    known = ", ".join(sorted(ARCHITECTURES))
    raise OptionError(
        f"llama.cpp LoRA GGUF output supports {known}; the base is {names or 'unknown'}",
        hint="write a PEFT adapter instead, or merge into the base (loramerge merge)",
    )


def _heads(config: Mapping[str, Any]) -> tuple[int, int]:
    try:
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise OptionError("the base config.json has no num_attention_heads") from None
    return heads, int(config.get("num_key_value_heads") or heads)


@dataclass(frozen=True)
class _Entry:
    """One module as GGUF tensors: `name` is the base tensor's GGUF name (`blk.0.attn_q.weight`)."""

    module: LoraModule
    name: str
    heads: int | None  # rows of lora_b permuted over this many heads
    embedding: bool  # token_embd: lora_a stored transposed (llama.cpp's get_rows on it)

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        r = self.module.r
        a_shape = (
            (self.module.lora_A.shape[1], r) if self.embedding else (r, self.module.lora_A.shape[1])
        )
        return a_shape, (self.module.lora_B.shape[0], r)

    def tensors(self, fold: float) -> tuple[torch.Tensor, torch.Tensor]:
        # a shallow copy loads without caching the value in the adapter: one module in memory
        lora_a = copy.copy(self.module.lora_A).load().to(torch.float32)
        lora_b = copy.copy(self.module.lora_B).load().to(torch.float64) * fold
        if self.heads is not None:
            lora_b = permute_rows(lora_b, self.heads)
        lora_a = lora_a.T if self.embedding else lora_a
        return lora_a.contiguous(), lora_b.to(torch.float32).contiguous()


def _plan(adapter: Adapter, config: Mapping[str, Any]) -> tuple[str, bool, list[_Entry]]:
    import gguf

    arch_member, permuted = architecture(config)
    arch = getattr(gguf.MODEL_ARCH, arch_member)
    blocks = int(config.get("num_hidden_layers") or 0)
    blocks = max(
        [blocks] + [int(p) + 1 for m in adapter.modules for p in m.split(".") if p.isdigit()]
    )
    names = gguf.get_tensor_name_map(arch, blocks)
    heads, kv_heads = _heads(config) if permuted else (0, 0)
    entries = []
    for module in adapter.modules.values():
        if module.kind not in (ModuleKind.LINEAR, ModuleKind.EMBEDDING):
            raise FormatError(
                f"llama.cpp LoRA cannot hold {module.kind.value} modules",
                file=adapter.source_path,
                module=module.path,
            )
        found = None
        for candidate in (module.path, "model." + module.path):
            found = names.get_type_and_name(candidate + ".weight", try_suffixes=(".weight",))
            if found is not None:
                break
        if found is None:
            raise FormatError(
                f"llama.cpp ({gguf.MODEL_ARCH_NAMES[arch]}) has no tensor for this module",
                file=adapter.source_path,
                module=module.path,
                hint="is the adapter for this base model?",
            )
        tensor_type, gguf_name = found
        embedding = tensor_type is gguf.MODEL_TENSOR.TOKEN_EMBD
        if embedding != (module.kind is ModuleKind.EMBEDDING):
            raise FormatError(
                f"maps to {gguf_name}, which does not match its kind",
                file=adapter.source_path,
                module=module.path,
            )
        rows = None
        if permuted and tensor_type is gguf.MODEL_TENSOR.ATTN_Q:
            rows = heads
        elif permuted and tensor_type is gguf.MODEL_TENSOR.ATTN_K:
            rows = kv_heads
        if rows is not None and module.lora_B.shape[0] % (2 * rows):
            raise FormatError(
                f"lora_B has {module.lora_B.shape[0]} rows, not a multiple of 2 x {rows} heads",
                file=adapter.source_path,
                module=module.path,
                hint="is the adapter for this base model?",
            )
        entries.append(_Entry(module, gguf_name, rows, embedding))
    return gguf.MODEL_ARCH_NAMES[arch], permuted, entries


def write(adapter: Adapter, path: Path, base_config: Mapping[str, Any]) -> None:
    """Write a LoRA GGUF at `path`: metadata and tensor infos first, then tensor by tensor."""
    import gguf
    import numpy as np

    arch, permuted, entries = _plan(adapter, base_config)
    # llama.cpp scales each tensor by alpha / rank (or 1 without alpha): one alpha when it fits
    # every module, else every scale folded into lora_b.
    alpha = common_alpha([e.module for e in entries])
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    if alpha is not None:
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_string(KEY_VERSION, __version__)
    if adapter.base_model:
        writer.add_string(KEY_BASE, str(adapter.base_model))
    writer.add_bool(KEY_PERMUTED, permuted)
    if permuted:
        heads, kv_heads = _heads(base_config)
        writer.add_uint32(KEY_HEADS, heads)
        writer.add_uint32(KEY_KV_HEADS, kv_heads)
    if entries:
        writer.add_array(KEY_PATHS, [e.module.path for e in entries])
        writer.add_array(KEY_NAMES, [e.name for e in entries])
    for entry in entries:
        for suffix, shape in zip((".lora_a", ".lora_b"), entry.shapes(), strict=True):
            writer.add_tensor_info(
                entry.name + suffix, shape, np.dtype(np.float32), 4 * shape[0] * shape[1]
            )
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for entry in entries:
            fold = 1.0 if alpha is not None else entry.module.scale
            for tensor in entry.tensors(fold):
                writer.write_tensor_data(tensor.numpy())
        writer.close()
    except OSError as exc:
        raise short_write_cause(exc, path) from exc


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
    permuted = bool(fields.get(KEY_PERMUTED, _PERMUTED_ARCHS.get(arch, False)))
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
        return _heads(base_config)
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
    needs_heads = _PERMUTED_ARCHS.get(arch, False) and any(
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
