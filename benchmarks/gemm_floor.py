"""The compute floor of a merge: every product B @ A of an adapter, timed alone with torch.

    python benchmarks/gemm_floor.py ADAPTER_FOLDER

Reads a PEFT adapter's factors (float32), forms each module's full product B @ A (out x in, as a
merge must) with torch's default threads (every core) into a buffer reused per shape, after one
untimed product of each shape, and prints JSON: the seconds the products took, their FLOPs and
the rate. A merge cannot take less than this on the same machine, whatever it overlaps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def main(folder: Path) -> dict:
    tensors = load_file(folder / "adapter_model.safetensors")
    pairs = []
    for name, lora_a in tensors.items():
        if name.endswith(".lora_A.weight"):
            lora_b = tensors[name.replace(".lora_A.", ".lora_B.")]
            pairs.append((lora_b.float().contiguous(), lora_a.float().contiguous()))
    buffers: dict[tuple[int, int], torch.Tensor] = {}
    for lora_b, lora_a in pairs:  # one product of each shape first: pages and kernels warm
        shape = (lora_b.shape[0], lora_a.shape[1])
        if shape not in buffers:
            buffers[shape] = torch.empty(shape)
            torch.mm(lora_b, lora_a, out=buffers[shape])
    started = time.perf_counter()
    flops = 0
    for lora_b, lora_a in pairs:
        torch.mm(lora_b, lora_a, out=buffers[(lora_b.shape[0], lora_a.shape[1])])
        flops += 2 * lora_b.shape[0] * lora_b.shape[1] * lora_a.shape[1]
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "flops": flops, "gflops_per_s": flops / seconds / 1e9,
            "threads": torch.get_num_threads(), "modules": len(pairs)}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
