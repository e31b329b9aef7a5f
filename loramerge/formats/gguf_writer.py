"""llama.cpp LoRA GGUF output: written tensor by tensor with the gguf package."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramerge import __version__
from loramerge.adapter import Adapter, LoraModule, ModuleKind, common_alpha
from loramerge.errors import FormatError
from loramerge.formats.gguf_arch import (
    KEY_BASE,
    KEY_HEADS,
    KEY_KV_HEADS,
    KEY_NAMES,
    KEY_PATHS,
    KEY_PERMUTED,
    KEY_VERSION,
    architecture,
    attention_heads,
    permute_rows,
)
from loramerge.io.atomic import short_write_cause


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
    heads, kv_heads = attention_heads(config) if permuted else (0, 0)
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
        heads, kv_heads = attention_heads(base_config)
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
