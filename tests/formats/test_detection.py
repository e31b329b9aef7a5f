"""Every input the fixtures hold, each written by the tool named in fixtures/README.md, is claimed
by exactly one format's sniffer: the one of the tool that wrote it. No sniffer claims another
tool's file, so detection never has to pick between two."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FIXTURES

from loramerge.formats.registry import INPUT_FORMATS, detect


def _children(folder: str) -> list[Path]:
    return sorted(p for p in (FIXTURES / folder).iterdir() if p.is_dir())


def _files(folder: str, pattern: str) -> list[Path]:
    return sorted(p for p in (FIXTURES / folder).glob(pattern) if ".ref." not in p.name)


# (input, the format of the tool that wrote it)
WRITTEN_BY = (
    [(path, "peft") for path in _children("adapters")]  # PEFT save_pretrained
    + [(path, "peft") for path in _children("peft-tuners")]  # PEFT, every tuner
    + [(path, "peft") for path in _children("cola")]  # PEFT links of a chain
    + [(path, "mlx-lm") for path in _children("mlx-lm")]  # mlx-lm's trainer
    + [(FIXTURES / "torchtune" / n / "adapter_model.pt", "torchtune") for n in ("lora", "dora")]
    + [(path, "lycoris") for path in _files("lycoris", "*.safetensors")]  # LyCORIS 4.1.3
    + [(FIXTURES / "kohya" / "llama-lora.safetensors", "kohya")]
    + [(FIXTURES / "kohya-sd" / f"{n}-lora.safetensors", "kohya") for n in ("sd1", "sdxl-te1te2")]
    + [(FIXTURES / "kohya-sd" / "sd1-dylora.safetensors", "kohya-dylora")]  # sd-scripts DyLoRA
    + [(FIXTURES / "dylora" / "kohya-dylora.safetensors", "kohya-dylora")]
    + [(FIXTURES / "dylora" / "official", "dylora")]  # the DyLoRA paper's loralib layout
    + [(path, "diffusers") for path in _children("diffusers")]  # diffusers save_lora_weights
)


def _claims(path: Path) -> list[str]:
    return [entry.name for entry in INPUT_FORMATS if entry.sniff(path)]


@pytest.mark.parametrize(
    ("path", "written_by"), WRITTEN_BY, ids=[str(p.relative_to(FIXTURES)) for p, _ in WRITTEN_BY]
)
def test_each_input_is_claimed_by_its_writer_s_format_alone(path, written_by):
    assert path.exists(), path
    assert _claims(path) == [written_by]
    assert detect(path).name == written_by


def test_every_fixture_folder_is_covered_or_holds_no_adapter_input():
    """A new fixture folder of adapters has to join the list above."""
    covered = {p.relative_to(FIXTURES).parts[0] for p, _ in WRITTEN_BY}
    # base models, text, tool scripts, and ResLoRA checkpoints (read by `reslora`, never sniffed)
    not_inputs = {"bases", "sd-base", "text", "tools", "reslora", "__pycache__"}
    folders = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert folders - not_inputs == covered


def test_a_gguf_adapter_is_claimed_by_gguf_alone(cli, tmp_path):
    """GGUF files are written by loramerge itself here; the gguf package reads them in
    tests/formats/test_gguf.py."""
    out = tmp_path / "lora.gguf"
    result = cli(
        "convert", FIXTURES / "adapters" / "llama-lora", "--to", "gguf", "--base",
        FIXTURES / "bases" / "llama", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _claims(out) == ["gguf"]
