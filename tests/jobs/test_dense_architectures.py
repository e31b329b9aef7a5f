"""Dense updates on layers and options the fixtures do not cover, each made by PEFT itself on
a tiny model of the architecture suite and checked against PEFT's live forward: IA3 on layers
with biases (Qwen2's q/k/v), on GPT-2's Conv1D and on ResNet's convolutions; FourierFT and
RandLoRA on Conv1D; OFT with COFT, one shared block and the exact Cayley transform; HRA with
Gram-Schmidt; BOFT and HRA on convolutions. OFT on a convolution has no merged form and is
refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from architectures import ARCH, forward, make_inputs, perturb, save_base

TOLERANCE = 1e-5  # of the largest output, float32
# the 3x3 convolutions of ResNet's first blocks: 8 or 16 input channels, 72 or 144 columns
RESNET_3X3 = r".*stages\.\d\.layers\.0\.layer\.\d\.convolution"
MOVES_AT_LEAST = 1e-3


@dataclass(frozen=True)
class DenseCase:
    id: str
    arch: str
    config: str  # a PEFT config class
    kwargs: dict


CASES = [
    DenseCase("ia3-biases", "qwen2", "IA3Config", dict(
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"])),
    DenseCase("ia3-conv1d", "gpt2", "IA3Config", dict(
        target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
        fan_in_fan_out=True)),
    DenseCase("ia3-conv2d", "resnet", "IA3Config", dict(
        target_modules=r".*convolution", feedforward_modules=r".*layer\.1\.convolution")),
    DenseCase("fourierft-conv1d", "gpt2", "FourierFTConfig", dict(
        target_modules=["c_attn"], n_frequency=40, scaling=50.0, fan_in_fan_out=True)),
    DenseCase("randlora-conv1d", "gpt2", "RandLoraConfig", dict(
        target_modules=["c_attn", "c_fc"], r=4, fan_in_fan_out=True)),
    DenseCase("oft-coft-shared-cayley", "qwen2", "OFTConfig", dict(
        target_modules=["q_proj", "o_proj"], oft_block_size=8, r=0, coft=True, eps=0.5,
        block_share=True, use_cayley_neumann=False)),
    DenseCase("hra-gram-schmidt", "qwen2", "HRAConfig", dict(
        target_modules=["q_proj", "up_proj"], r=4, apply_GS=True)),
    DenseCase("hra-conv2d", "resnet", "HRAConfig", dict(target_modules=RESNET_3X3, r=4)),
    DenseCase("boft-conv2d", "resnet", "BOFTConfig", dict(
        target_modules=RESNET_3X3, boft_block_size=8)),
]  # fmt: skip


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense-bases")
    return {name: save_base(ARCH[name], root / name) for name in {c.arch for c in CASES}}


def _adapter(
    case: DenseCase, base: Path, out: Path, run: bool = True
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PEFT's adapter for the case, its forward and the base's on the arch's inputs."""
    import peft

    arch = ARCH[case.arch]
    torch.manual_seed(3)
    model = arch.model_cls().from_pretrained(base, dtype=torch.float32).eval()
    inputs = make_inputs(arch, model.config)
    plain = forward(model, inputs)
    config = getattr(peft, case.config)(**case.kwargs)
    adapted = peft.get_peft_model(model, config)
    assert perturb(adapted, seed=11, scale=0.1) > 0
    adapted.save_pretrained(out)
    return (forward(adapted.eval(), inputs), plain) if run else None


@pytest.mark.oracle
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_merge_matches_peft_forward(cli, bases, tmp_path, case):
    arch = ARCH[case.arch]
    adapter = tmp_path / "adapter"
    found = _adapter(case, bases[case.arch], adapter)
    assert found is not None
    expected, plain = found
    out = tmp_path / "merged"
    result = cli("merge", adapter, "--base", bases[case.arch], "-o", out, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    model = arch.auto_cls().from_pretrained(out, dtype=torch.float32).eval()
    got = forward(model, make_inputs(arch, model.config))
    top = float(expected.abs().max())
    assert float((plain - expected).abs().max()) / top > MOVES_AT_LEAST
    assert float((got - expected).abs().max()) / top <= TOLERANCE
    if case.id == "ia3-biases":  # output scaling scales the bias too (PEFT's forward)
        assert "0 biases" not in result.output


def test_oft_on_a_convolution_is_refused(cli, bases, tmp_path):
    case = DenseCase("oft-conv2d", "resnet", "OFTConfig", dict(
        target_modules=RESNET_3X3, oft_block_size=8, r=0))  # fmt: skip
    adapter = tmp_path / "adapter"
    _adapter(case, bases["resnet"], adapter, run=False)
    result = cli("merge", adapter, "--base", bases["resnet"], "-o", tmp_path / "merged")
    assert result.exit_code == 1, result.output
    assert "OFT on a conv layer" in result.output and "unfolded input patches" in result.output
