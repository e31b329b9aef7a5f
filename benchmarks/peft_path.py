"""The PEFT path the merge benchmark compares against: load, PeftModel, merge_and_unload, save."""

from __future__ import annotations

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(base: str, adapter: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
