"""Shared test helpers: fixture paths, the PEFT oracle, running the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
BASES = FIXTURES / "bases"
ADAPTERS = FIXTURES / "adapters"

# (adapter, base) pairs that every merge test runs over
MERGE_CASES = [
    ("llama-lora", "llama"),
    ("llama-rslora-patterns", "llama"),
    ("llama-dora", "llama"),
    ("llama-modules-to-save", "llama"),
    ("llama-tied-embedding", "llama-tied"),
    ("llama-tied-modules-to-save", "llama-tied"),
    ("gpt2-lora", "gpt2"),
    ("gpt2-dora", "gpt2"),
]
MERGE_CASES = [(a, b) for a, b in MERGE_CASES if (ADAPTERS / a).exists()]


def kohya_dylora_with_unit(folder: Path, unit: int) -> Path:
    """The kohya DyLoRA fixture as if trained with `unit` (only multiples of it are prefixes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = FIXTURES / "dylora" / "kohya-dylora.safetensors"
    with safe_open(source, "pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    metadata["ss_network_args"] = json.dumps({"unit": str(unit)})
    path = folder / f"unit{unit}.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path


def token_ids(base: Path, length: int = 48) -> torch.Tensor:
    """Token ids of the held-out text, tokenised with the base's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    text = (FIXTURES / "text" / "eval.txt").read_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :length]
    return torch.cat([ids, ids.flip(1)], dim=0)


def load_causal_lm(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def peft_logits(adapter: Path, base: Path, ids: torch.Tensor) -> torch.Tensor:
    """The oracle: PEFT's own PeftModel on the float32 base, adapter applied live."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base), adapter).eval()
    with torch.no_grad():
        return model(ids).logits


def model_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_causal_lm(folder)(ids).logits


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def assert_one_error(result, *needles: str) -> None:
    """A user error: exit status 1 and exactly one `error:` line holding every needle."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_usage_error(result, *needles: str) -> None:
    """Click's convention for usage errors: exit status 2, the usage line, and one
    `Error: ...` line holding every needle."""
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Usage: loramerge "), result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1, result.output
    for needle in needles:
        assert needle in error[0], (needle, error[0])
    assert "Traceback" not in result.output


def console_script() -> Path:
    """The installed `loramerge` command of this interpreter's environment (skip without one)."""
    script = Path(sys.executable).parent / "loramerge"
    if not script.exists():
        found = shutil.which("loramerge")
        if found is None:
            pytest.skip("the loramerge console script is not installed")
        script = Path(found)
    return script
