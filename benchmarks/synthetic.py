"""Synthetic Llama-shaped bases and rank-r adapters for the merge benchmark (random, seeded)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from llama_shape import PROJECTIONS, LlamaShape  # benchmarks/ is on sys.path for scripts

from loramerge.io.safetensors_writer import OutputTensor, StreamingWriter, save_tensors


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


def random_factors(
    shape: LlamaShape, rank: int, seed: int
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module, A, B) of rank `rank` for every projection of every layer, float32, seeded."""
    generator = torch.Generator().manual_seed(seed)
    for name, (out_features, in_features) in shape.projections():
        module = name.removesuffix(".weight")
        lora_a = torch.randn(rank, in_features, generator=generator) * 0.02
        yield module, lora_a, torch.randn(out_features, rank, generator=generator) * 0.02


def write_adapter(folder: Path, shape: LlamaShape, rank: int = 16, seed: int = 1) -> None:
    """A PEFT adapter of rank `rank` on every linear module of every layer (float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, lora_a, lora_b in random_factors(shape, rank, seed):
        stem = "base_model.model." + module
        tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = lora_a, lora_b
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


def write_reslora(folder: Path, shape: LlamaShape, rank: int = 16, seed: int = 2) -> None:
    """An official ResLoRA checkpoint ("is": each block's input adds the previous block's) of
    rank `rank` on every projection: the pickled state dict and reslora_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for module, lora_a, lora_b in random_factors(shape, rank, seed):
        state[f"{module}.loras.0.lora_A"], state[f"{module}.loras.0.lora_B"] = lora_a, lora_b
    torch.save(state, folder / "pytorch_model_lora.bin")
    config = {"rank": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "start_index": 0,
              "target_modules": "q.k.v.o.g.u.d", "lora_num": 1, "merge_weights": True,
              "res_flag": 1, "merge_flag": 0, "pre_num": 0, "merge_4_len": 100}  # fmt: skip
    (folder / "reslora_config.json").write_text(json.dumps(config, indent=4))


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic base and adapters.")
    parser.add_argument("work", type=Path, help="folder that gets base/ and adapter-r<rank>/")
    parser.add_argument("--layers", type=int, default=LlamaShape().layers)
    parser.add_argument("--large", action="store_true", help="Llama-2-7B widths")
    parser.add_argument("--ranks", default="16", help="comma-separated adapter ranks")
    parser.add_argument("--links", type=int, default=0, help="rank-16 chain links link-<i>/")
    parser.add_argument("--reslora", action="store_true", help="a rank-16 ResLoRA checkpoint")
    args = parser.parse_args()
    shape = LlamaShape.large(args.layers) if args.large else LlamaShape(layers=args.layers)
    if not (args.work / "base" / "config.json").exists():
        write_base(args.work / "base", shape)
    for rank in (int(r) for r in args.ranks.split(",")):
        if not (args.work / f"adapter-r{rank}" / "adapter_config.json").exists():
            write_adapter(args.work / f"adapter-r{rank}", shape, rank=rank)
    for link in range(1, args.links + 1):
        if not (args.work / f"link-{link}" / "adapter_config.json").exists():
            write_adapter(args.work / f"link-{link}", shape, rank=16, seed=100 + link)
    if args.reslora and not (args.work / "reslora" / "reslora_config.json").exists():
        write_reslora(args.work / "reslora", shape)


if __name__ == "__main__":
    main()
