"""What loramerge asks of transformers, checked against transformers itself.

The stored layout (which tensor of the files holds which part of an in-memory parameter) is
computed by loramerge from transformers' conversion rules; the oracle is transformers' own
`revert_weight_conversion`, the function `save_pretrained` uses, run on tensors whose every
element holds its own index. Module kinds and tied groups are compared with the model's modules
and with a model loaded by `from_pretrained`.
"""

from __future__ import annotations

import json

import pytest
import torch
from architectures import ARCHS, build_model

from loramerge.adapter import ModuleKind
from loramerge.model.architecture import Architecture, NoArchitecture, build_architecture

# every architecture of the suite that transformers saves under other names than it holds
CONVERTED = ["mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "granitemoe", "phimoe", "deepseek-v3",
             "vit", "vivit", "videomae", "gpt-neox"]  # fmt: skip


def _architecture(arch) -> tuple[Architecture, torch.nn.Module]:
    model = build_model(arch)
    config = json.loads(model.config.to_json_string())
    config["architectures"] = [type(model).__name__]  # as save_pretrained writes it
    found = build_architecture(config)
    assert isinstance(found, Architecture), found
    return found, model


@pytest.mark.parametrize("name", CONVERTED)
def test_stored_pieces_are_what_transformers_saves(name):
    from transformers.core_model_loading import revert_weight_conversion

    arch = next(a for a in ARCHS if a.name == name)
    architecture, model = _architecture(arch)
    indexed, offset = {}, 0
    for param, value in model.named_parameters():  # buffers take no LoRA
        indexed[param] = torch.arange(offset, offset + value.numel(), dtype=torch.float64).reshape(
            value.shape
        )
        offset += value.numel()
    saved = revert_weight_conversion(model, dict(indexed))
    covered = set()
    renamed = 0
    for param in architecture.parameters:
        if param not in indexed:
            continue  # a tied target: not saved
        for piece in architecture.stored_pieces(param):
            index = tuple(slice(*i) if isinstance(i, tuple) else i for i in piece.index)
            value = indexed[param][index]
            expected = saved[piece.name]
            assert torch.equal(value.T if piece.transposed else value, expected), (param, piece)
            covered.add(piece.name)
            renamed += piece.name != param
    assert covered == set(saved)
    assert renamed, f"{name}: expected some parameters stored under other names"


def test_module_kinds_come_from_the_model_not_the_names():
    gpt2 = next(a for a in ARCHS if a.name == "gpt2-square")
    architecture, model = _architecture(gpt2)
    from transformers.pytorch_utils import Conv1D

    for path, info in architecture.modules.items():
        module = model.get_submodule(path)
        if isinstance(module, Conv1D):
            assert info.kind is ModuleKind.CONV1D, path
        elif isinstance(module, torch.nn.Embedding):
            assert info.kind is ModuleKind.EMBEDDING, path
        elif isinstance(module, torch.nn.Linear):
            assert info.kind is ModuleKind.LINEAR, path
    # square Conv1D and a square Linear head side by side, told apart by their classes
    assert architecture.modules["transformer.h.0.attn.c_proj"].kind is ModuleKind.CONV1D
    assert architecture.modules["lm_head"].kind is ModuleKind.LINEAR


@pytest.mark.parametrize(
    ("name", "head"),
    [("whisper", "proj_out.weight"), ("bert-mlm", "cls.predictions.decoder.weight"),
     ("llama-tied", "lm_head.weight"), ("t5", "lm_head.weight")],
)  # fmt: skip
def test_tied_heads_are_the_architectures_own(name, head):
    arch = next(a for a in ARCHS if a.name == name)
    architecture, model = _architecture(arch)
    assert head in architecture.tied
    # the model itself shares the storage of every tied pair
    for target, source in architecture.tied.items():
        assert model.get_parameter(target) is model.get_parameter(source), (target, source)


def test_remote_code_is_never_run():
    found = build_architecture({"model_type": "my-own", "auto_map": {"AutoModel": "x.Y"}})
    assert isinstance(found, NoArchitecture)
    assert "trust_remote_code" in found.reason
