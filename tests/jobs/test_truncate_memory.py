"""`truncate --merge` holds no reduced adapter: a prefix cut or an SVD reduction is computed again
when the merge engine reads a module's factors, with the bits the held factors had. What the
values are is checked against independent oracles in test_truncate.py."""

from __future__ import annotations

import pytest
import torch
from helpers import ADAPTERS, BASES, FIXTURES

OFFICIAL = FIXTURES / "dylora" / "official"


@pytest.mark.parametrize(
    ("source", "extra"),
    [
        (OFFICIAL, {"method": "prefix", "alpha": 8.0}),
        (ADAPTERS / "llama-lora", {"method": "svd"}),
        (ADAPTERS / "llama-dora", {"method": "svd"}),
    ],
)
def test_merge_holds_no_reduced_factors(monkeypatch, tmp_path, source, extra):
    import loramerge.jobs.truncate as truncate
    from loramerge.jobs.truncate import TruncateOptions, truncate_adapter

    merged = []
    merge = truncate.merge_adapter

    def recorded(adapter, *args, **kwargs):
        merged.append(adapter)
        return merge(adapter, *args, **kwargs)

    monkeypatch.setattr(truncate, "merge_adapter", recorded)
    alpha = extra.pop("alpha", None)
    options = TruncateOptions(ranks=(2,), merge=True, **extra)
    truncate_adapter(source, tmp_path / "out", options, alpha=alpha, base=BASES / "llama")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    (adapter,) = merged
    factors = [t for m in adapter.modules.values() for t in (m.lora_A, m.lora_B)]
    assert factors and not any(t.loaded for t in factors)
    assert all(tuple(t.read().shape) == t.shape for t in factors)  # formed again when read
    assert not any(t.loaded for t in factors)


@pytest.mark.parametrize("rank", [1, 2])
def test_reductions_formed_when_read_have_the_held_bits(rank):
    """reduce_svd(keep=False) gives, factor by factor, the bits reduce_svd gives, and keeps
    none of them; the prefix cut likewise against the stored factors' slices."""
    from loramerge.formats.registry import read_adapter
    from loramerge.lazy_tensor import RecentValues
    from loramerge.ops.rank_truncation import reduce_svd, truncate_prefix

    adapter = read_adapter(ADAPTERS / "llama-lora")
    held, held_rows = reduce_svd(adapter, rank=rank)
    formed, formed_rows = reduce_svd(adapter, rank=rank, keep=False)
    assert formed_rows == held_rows
    modules = list(formed.modules)
    assert len(modules) > RecentValues().size  # the first module's are formed again
    for path in modules + modules[:1]:
        for part in ("lora_A", "lora_B"):
            value = getattr(formed.modules[path], part)
            assert not value.loaded
            assert torch.equal(value.read(), getattr(held.modules[path], part).load())
    cut, _ = truncate_prefix(adapter, rank)
    for path, module in cut.modules.items():
        stored = adapter.modules[path]
        assert not module.lora_A.loaded and not module.lora_B.loaded
        assert torch.equal(module.lora_A.read(), stored.lora_A.read()[:rank])
        assert torch.equal(module.lora_B.read(), stored.lora_B.read()[:, :rank])
