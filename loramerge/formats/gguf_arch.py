"""What the llama.cpp LoRA GGUF reader and writer share: the architectures llama.cpp converts,
loramerge's own metadata keys, head counts, and convert_hf_to_gguf's q/k row permutation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from loramerge.errors import OptionError

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
PERMUTED_ARCHS = {"llama": True, "qwen2": False}
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


def attention_heads(config: Mapping[str, Any]) -> tuple[int, int]:
    try:
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise OptionError("the base config.json has no num_attention_heads") from None
    return heads, int(config.get("num_key_value_heads") or heads)
