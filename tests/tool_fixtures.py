"""Checks against the reference outputs that other tools stored beside their fixtures
(fixtures/peft-tuners, fixtures/mlx-lm, fixtures/torchtune: reference.safetensors holds the
input ids and the tool's own float32 logits)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from helpers import FIXTURES, load_causal_lm
from safetensors.torch import load_file

PEFT_TUNERS = FIXTURES / "peft-tuners"
MLX_LM = FIXTURES / "mlx-lm"
TORCHTUNE = FIXTURES / "torchtune"
TOOLS = FIXTURES / "tools"
# the float32 logits must agree to this share of the largest logit
TOLERANCE = 1e-5
# and the adapter must move the logits by far more, or the comparison proves nothing
MOVES_AT_LEAST = 1e-3


def reference(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "reference.safetensors")


def peft_errors(peft_folder: Path, base: Path, tool_folder: Path) -> tuple[float, float]:
    """(max |PEFT logits - tool logits|, max |base logits - tool logits|), both relative to the
    tool's largest logit: PeftModel.from_pretrained on the float32 base is the reader's side."""
    from peft import PeftModel

    ref = reference(tool_folder)
    ids, expected = ref["input_ids"], ref["logits"]
    model = load_causal_lm(base)
    with torch.no_grad():
        plain = model(ids).logits
        adapted = PeftModel.from_pretrained(model, peft_folder).eval()(ids).logits
    top = float(expected.abs().max())
    return float((adapted - expected).abs().max()) / top, float(
        (plain - expected).abs().max()
    ) / top


def assert_matches_tool(peft_folder: Path, base: Path, tool_folder: Path) -> float:
    error, moved = peft_errors(peft_folder, base, tool_folder)
    assert moved > MOVES_AT_LEAST, f"the adapter barely moves the logits ({moved:.2e})"
    assert error <= TOLERANCE, f"logits differ from the tool's by {error:.2e} of the largest"
    return error


def importable(*names: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in names)
