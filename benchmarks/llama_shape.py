"""The shape of the benchmark's synthetic Llama models; no torch, so the benchmark's own
process can plan sizes without importing it (its mapped libraries would stay cached)."""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    def projections(self) -> list[tuple[str, tuple[int, ...]]]:
        """The weights of the seven linear modules of every layer, in file order."""
        return [(n, dims) for n, dims in self.tensors() if n.endswith("proj.weight")]

    @classmethod
    def large(cls, layers: int) -> LlamaShape:
        """Llama-2-7B's widths (hidden 4096, MLP 11008, 32 heads without grouping) with `layers`
        layers: 24 layers make 5.1B parameters, 32 the 6.7B of the original."""
        return cls(hidden=4096, intermediate=11008, layers=layers, heads=32, kv_heads=32)

    def bytes(self, itemsize: int = 2) -> int:
        return self.parameters() * itemsize

    def adapter_bytes(self, rank: int) -> int:
        """float32 bytes of a rank-`rank` adapter on every projection."""
        return sum(4 * rank * sum(dims) for _, dims in self.projections())

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
