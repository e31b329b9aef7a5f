"""`reslora` holds neither the checkpoint nor the plain adapter it computes: a rule reads a
block's factors only where its norms need them, the plain factors are formed when the merge
engine reads them, and a pickled checkpoint is mapped rather than read into memory. What the
values are is checked against independent oracles in test_reslora.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import BASES, FIXTURES
from safetensors.torch import save_file

RESLORA = FIXTURES / "reslora"
BASE = BASES / "llama"


def _single_file(kind: str, folder: Path) -> Path:
    """The fixture as one safetensors file with its config in the metadata (read lazily)."""
    state = torch.load(RESLORA / kind / "pytorch_model_lora.bin", weights_only=True)
    config = (RESLORA / kind / "reslora_config.json").read_text()
    folder.mkdir()
    path = folder / "loras.safetensors"
    save_file(state, path, metadata={"reslora_config": config})
    return path


@pytest.mark.parametrize(("kind", "extra"), [("bs", {}), ("ms", {}), ("is", {"rank": 2})])
def test_merge_keeps_no_factors(tmp_path, kind, extra):
    from loramerge.jobs.reslora import reslora
    from loramerge.jobs.reslora_options import ResLoraOptions

    checkpoint = _single_file(kind, tmp_path / "ckpt")
    result = reslora(checkpoint, BASE, tmp_path / "out", ResLoraOptions(**extra), merge=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    conversion = result.conversion
    stored = [
        t for _, _, block in conversion.checkpoint.blocks() for pair in block.loras for t in pair
    ]
    assert stored and not any(t.loaded for t in stored)
    modules = conversion.adapter.modules.values()
    assert modules and not any(m.lora_A.loaded or m.lora_B.loaded for m in modules)
    if kind == "bs":  # stacking: plain ranks above the checkpoint's, and nothing held them
        rank = json.loads((RESLORA / "bs" / "reslora_config.json").read_text())["rank"]
        assert max(m.r for m in modules) > rank


def test_formed_factors_are_those_of_the_form(tmp_path):
    """A factor read twice, with other modules read between, is formed again and is the same."""
    from loramerge.jobs.reslora_conversion import convert_reslora
    from loramerge.lazy_tensor import RecentValues

    conversion = convert_reslora(_single_file("bs", tmp_path / "ckpt"), BASE)
    modules = list(conversion.adapter.modules.values())
    assert len(modules) > RecentValues().size
    first = [modules[0].lora_A.read(), modules[0].lora_B.read()]
    for module in modules[1:]:
        module.lora_B.read(), module.lora_A.read()
    again = [modules[0].lora_A.read(), modules[0].lora_B.read()]
    for before, after in zip(first, again, strict=True):
        assert before is not after and torch.equal(before, after)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_pickled_zip_files_are_mapped_not_read():
    from loramerge.formats.common import load_pickle_weights

    path = (RESLORA / "is" / "pytorch_model_lora.bin").resolve()
    tensors = load_pickle_weights(path)
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, stop = (int(x, 16) for x in line.split()[0].split("-"))
            mapped.append((start, stop))
    assert mapped, "the file is not mapped"
    for name, tensor in tensors.items():
        pointer = tensor.data_ptr()
        assert any(start <= pointer < stop for start, stop in mapped), name


def test_rules_read_factors_only_for_their_norms():
    """bs, and the rules from statistics, decide forms without reading a factor; the
    weight-based rule reads each block once, in chain order."""
    from loramerge.ops import reslora_rules as rules

    read: list[int] = []
    generator = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randn(6, 2, generator=generator, dtype=torch.float64),
         torch.randn(2, 5, generator=generator, dtype=torch.float64))
        for _ in range(4)
    ]  # fmt: skip

    class Counting(list):
        def __getitem__(self, n):
            read.append(n)
            return super().__getitem__(n)

    chain = Counting(pairs)
    blocks = list(rules.merge_bs(chain, 0.5, -1))
    list(rules.merge_is_inputs(chain, 0.5, [1.0, 2.0, 3.0, 4.0]))
    list(rules.merge_ms_amerge_inputs(chain, 0.5, 2, [1.0, 2.0, 3.0, 4.0]))
    assert read == []
    B, A = blocks[3].form.factors(pairs)
    expected = sum(b @ a for b, a in pairs)
    assert B.shape == (6, 8) and torch.allclose(B @ A, expected, rtol=0, atol=1e-12)

    products = [rules.BaseProducts(1.0, torch.zeros(2, 5, dtype=torch.float64))] * 4
    decided = rules.merge_is_weights(chain, 0.5, products)
    for n in range(4):  # a block's factors are read when the block is asked for
        next(decided)
        assert read == list(range(n + 1))


def test_one_bar_follows_the_norms_pass_and_the_merge(tmp_path):
    """The weight-based norms read every block's base weight before the merge writes: one bar
    over both passes, which never goes back and ends where both are done."""
    from loramerge.jobs.reslora import reslora
    from loramerge.model.folder import open_base

    seen: list[tuple[int, int]] = []
    result = reslora(
        RESLORA / "is", BASE, tmp_path / "out", merge=True, progress=lambda *a: seen.append(a)
    )
    read = result.conversion.bytes_read
    located = open_base(BASE).locate()
    weights = sum(located[f"{b.path}.weight"][1].nbytes for b in _blocks(result.conversion))
    assert read == weights > 0
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    done, total = seen[-1]
    assert done == total and total - read >= result.bytes_written > 0  # the files, with headers


def _blocks(conversion):
    return [block for _, _, block in conversion.checkpoint.blocks()]


def test_weight_norms_read_the_base_in_layer_order(monkeypatch):
    """Across chains, block n of every chain is decided before any block n + 1: the base is read
    front to back (as its files store the layers), not once per chain, and the numbers are the
    same as chain by chain (test_reslora.py's oracles)."""
    from loramerge.formats.reslora_chains import natural_order
    from loramerge.jobs.reslora_conversion import convert_reslora
    from loramerge.jobs.reslora_weights import BaseWeights

    read: list[str] = []
    products = BaseWeights.products

    def recorded(self, path, B, official):
        read.append(path)
        return products(self, path, B, official)

    monkeypatch.setattr(BaseWeights, "products", recorded)
    result = convert_reslora(RESLORA / "ms", BASE)
    assert len({block.chain for block in result.blocks}) > 1
    assert read == sorted(read, key=natural_order) and len(read) == len(result.blocks)


def test_a_file_that_cannot_be_mapped_is_read(monkeypatch):
    """Some file systems refuse mmap: the same tensors are then read into memory."""
    from loramerge.formats.common import load_pickle_weights

    path = RESLORA / "is" / "pytorch_model_lora.bin"
    expected = torch.load(path, weights_only=True)
    load = torch.load
    mapped: list[bool] = []

    def refusing(*args, **kwargs):
        mapped.append(bool(kwargs.get("mmap")))
        if kwargs.get("mmap"):
            raise OSError("mmap: operation not supported")
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", refusing)
    tensors = load_pickle_weights(path)
    assert mapped == [True, False]
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)


def test_a_mapped_pickle_is_never_written(tmp_path):
    """The mapping is private: a tensor changed in place is a copy, the file stays as it was."""
    import hashlib
    import shutil

    from loramerge.formats.common import load_pickle_weights

    path = tmp_path / "loras.bin"
    shutil.copy(RESLORA / "is" / "pytorch_model_lora.bin", path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    tensor = next(iter(load_pickle_weights(path).values()))
    before = tensor.clone()
    tensor.mul_(2)
    assert torch.equal(tensor, before * 2)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert torch.equal(next(iter(load_pickle_weights(path).values())), before)
