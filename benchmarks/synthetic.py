"""Synthetic Llama-shaped bases and rank-r adapters for the merge benchmark (random, seeded)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge.safetensors_writer import OutputTensor, StreamingWriter, save_tensors

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        kv = self.kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, self.hidden),
            "k_proj": (kv, self.hidden),
            "v_proj": (kv, self.hidden),
            "o_proj": (self.hidden, self.hidden),
            "gate_proj": (self.intermediate, self.hidden),
            "up_proj": (self.intermediate, self.hidden),
            "down_proj": (self.hidden, self.intermediate),
        }
        found = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for layer in range(self.layers):
            stem = f"model.layers.{layer}"
            found.append((f"{stem}.input_layernorm.weight", (self.hidden,)))
            for name in PROJECTIONS:
                group = "self_attn" if name in PROJECTIONS[:4] else "mlp"
                found.append((f"{stem}.{group}.{name}.weight", shapes[name]))
            found.append((f"{stem}.post_attention_layernorm.weight", (self.hidden,)))
        found.append(("model.norm.weight", (self.hidden,)))
        found.append(("lm_head.weight", (self.vocab, self.hidden)))
        return found

    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }


def write_base(folder: Path, shape: LlamaShape, shard_bytes: int = 1 << 30, seed: int = 0) -> None:
    """A bf16 checkpoint with hub-style shards and index, written tensor by tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        nbytes = 2 * math.prod(dims)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, dims))
        size += nbytes
    weight_map = {}
    for index, group in enumerate(groups):
        file_name = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        layout = [OutputTensor(name, "BF16", dims) for name, dims in group]
        with StreamingWriter(folder / file_name, layout, {"format": "pt"}) as writer:
            for name, dims in group:
                if len(dims) == 1:
                    value = torch.ones(dims, dtype=torch.bfloat16)
                else:
                    value = (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16)
                writer.write_tensor(value)
                weight_map[name] = file_name
    total = sum(2 * math.prod(dims) for _, dims in shape.tensors())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=2))


def write_adapter(folder: Path, shape: LlamaShape, rank: int = 16, seed: int = 1) -> None:
    """A PEFT adapter of rank `rank` on every linear module of every layer (float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, dims in shape.tensors():
        if not name.endswith("proj.weight"):
            continue
        stem = "base_model.model." + name.removesuffix(".weight")
        out_features, in_features = dims
        tensors[f"{stem}.lora_A.weight"] = (
            torch.randn(rank, in_features, generator=generator) * 0.02
        )
        tensors[f"{stem}.lora_B.weight"] = (
            torch.randn(out_features, rank, generator=generator) * 0.02
        )
    save_tensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(PROJECTIONS),
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": str(folder.parent / "base"),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
