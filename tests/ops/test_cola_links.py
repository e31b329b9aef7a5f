"""The torch-free exact fold (loramerge.ops.cola_links.concatenated) against torch's
(loramerge.ops.cola_fold.fold_chain): the same adapter, bit for bit, for float32 and bfloat16
links with weights; and `fold` streams the base without the main thread waiting for torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import BASES, FIXTURES
from safetensors.torch import load_file, save_file

from loramerge.formats.cola_chain import read_chain
from loramerge.ops.cola_fold import fold_chain
from loramerge.ops.cola_links import concatenated

CHAIN = FIXTURES / "cola"

pytestmark = pytest.mark.skipif(not CHAIN.exists(), reason="fixtures/cola not built")


def _chain_copy(tmp_path: Path, dtype: torch.dtype, weights: tuple[float, ...]) -> Path:
    """The fixture chain with its factors stored in `dtype` and the manifest's weights."""
    chain = tmp_path / "chain"
    shutil.copytree(CHAIN, chain)
    for link in sorted(chain.glob("link-*")):
        path = link / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(path).items()}, path)
    manifest = json.loads((chain / "cola_chain.json").read_text())
    for entry, weight in zip(manifest["links"], weights, strict=True):
        entry["weight"] = weight
    (chain / "cola_chain.json").write_text(json.dumps(manifest))
    return chain


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.3, -2.5)])
def test_numpy_fold_is_torchs_fold_bit_for_bit(tmp_path, dtype, weights):
    chain = read_chain([_chain_copy(tmp_path, dtype, weights)])
    links = [(link.adapter, link.weight) for link in chain.links]
    found = concatenated(links)
    assert found is not None, "plain linear links stored as they are must fold without torch"
    expected = fold_chain(links, measure=False).adapter
    assert sorted(found.modules) == sorted(expected.modules)
    for path, module in found.modules.items():
        other = expected.modules[path]
        for part in ("lora_A", "lora_B"):
            got, want = getattr(module, part).load(), getattr(other, part).load()
            assert got.dtype == want.dtype == torch.float32, (path, part)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (path, part)
        fields = ("alpha", "r", "scale", "kind", "use_rslora", "fan_in_fan_out", "experts")
        for field in fields:
            assert getattr(module, field) == getattr(other, field), (path, field)
        assert module.bias is None and other.bias is None and module.magnitude is None
    for field in ("base_model", "source_format", "source_path", "task_type"):
        assert getattr(found, field) == getattr(expected, field), field


def test_links_torch_must_fold_are_left_to_it(tmp_path):
    """A link whose factors are computed rather than stored as they are (here: loaded already
    into a tensor with no file behind it) is not folded with numpy."""
    from dataclasses import replace

    from loramerge.adapter import LazyTensor

    chain = read_chain([CHAIN])
    first = chain.links[0].adapter
    path, module = next(iter(first.modules.items()))
    computed = LazyTensor.of(module.lora_A.load().clone())
    modules = {**first.modules, path: replace(module, lora_A=computed)}
    links = [(replace(first, modules=modules), 1.0)] + [
        (link.adapter, link.weight) for link in chain.links[1:]
    ]
    assert concatenated(links) is None


_WATCH = """
import sys, threading
from loramerge_cli import lazy_torch
lazy_torch.install()
real = lazy_torch._real
threads = []
def watched(stand_in):
    if not lazy_torch.loaded():
        threads.append(threading.current_thread().name)
    return real(stand_in)
lazy_torch._real = watched
from loramerge.jobs.fold import FoldOptions, fold
fold([sys.argv[1]], sys.argv[2], FoldOptions(), base=sys.argv[3])
print(" ".join(threads))
"""


def test_fold_streams_while_torch_is_imported_for_the_report(tmp_path):
    """As the command line runs it (torch behind its stand-in), a fold rounded once imports
    torch only on the thread that measures the report, never on the one that streams. The
    first run on a base and machine may import it for what it keeps in the cache folder (the
    base's architecture, the engine's check against torch); the second must not."""
    for run in ("first", "second"):
        out = tmp_path / run
        done = subprocess.run(
            [sys.executable, "-c", _WATCH, str(CHAIN), str(out), str(BASES / "llama")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in out.glob("*.safetensors"))
    assert done.stdout.split() == ["loramerge-fold-norms_0"], done.stdout


def test_fold_keeps_no_factors_in_memory(tmp_path):
    """Memory that does not grow with the chain: after a fold rounded once (and its report),
    no link's factors are held (each was read when it was needed), and the folded adapter the
    engine merged forms its factors anew each time they are read."""
    from loramerge.jobs.fold_load import load_chain
    from loramerge.jobs.fold_model import fold_to_model

    chain, _ = load_chain([CHAIN], BASES / "llama")
    result = fold_to_model(chain, BASES / "llama", tmp_path / "out")
    assert result.chain_norms and all(report.modules for report in result.links)
    assert result.merge is not None
    folded = result.merge.plan.adapter  # what the engine merged
    assert folded.source_format == "cola-chain" and folded.modules
    for adapter in [link.adapter for link in chain.links] + [folded]:
        for path, module in adapter.modules.items():
            assert not module.lora_A.loaded and not module.lora_B.loaded, path
    for path, module in folded.modules.items():
        for factor in (module.lora_A, module.lora_B):
            assert factor.raw is not None
            assert factor.raw()[0] is not factor.raw()[0], path
