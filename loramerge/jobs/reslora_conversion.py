"""A ResLoRA checkpoint on its base turned into a plain LoRA by the merge rules of docs/rules.md
section 4.

`convert_reslora` reads an official checkpoint, checks it against the base, applies the rule of
loramerge.ops.reslora_table that fits the checkpoint and the options, chain by chain, and
returns a plain `Adapter` with module paths as in the base. `_BaseReader` reads the base
weights in row tiles for the weight-based norms.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule
from loramerge.errors import FormatError, OptionError
from loramerge.formats import reslora_checkpoint as reslora_format
from loramerge.formats.reslora_checkpoint import ResLoraBlock, ResLoraChain, ResLoraCheckpoint
from loramerge.formats.reslora_stats import read_stats
from loramerge.io.safetensors_header import TensorEntry
from loramerge.io.safetensors_reader import SafetensorsReader
from loramerge.jobs.reslora_options import ResLoraOptions, choose_rule, estimator_text
from loramerge.model.folder import BaseModel, open_base
from loramerge.model.reslora_fit import check_against_base
from loramerge.ops import reslora_rules as rules
from loramerge.ops.reslora_table import INPUT_NORMS, MIDDLE_NORMS, OFFICIAL_WEIGHTS, WEIGHTS, Rule

TILE_BYTES = 32 << 20  # float64 bytes of base rows read at a time for the norms


@dataclass
class BlockReport:
    """One block's merge, as the CLI prints it."""

    module: str
    chain: str
    index: int
    layer: int | None
    rule: str
    rank: int
    alpha: float
    exact: bool
    coefficients: dict[str, float]
    norms: dict[str, float]
    stacked: list[int]
    energy_kept: float
    relative_error: float


@dataclass
class ResLoraConversion:
    checkpoint: ResLoraCheckpoint
    adapter: Adapter
    blocks: list[BlockReport]
    estimator: str  # what produced the coefficients, e.g. "weight-based norms"


def convert_reslora(
    checkpoint_path: str | Path, base_ref: str | Path, options: ResLoraOptions | None = None
) -> ResLoraConversion:
    """The plain LoRA that a ResLoRA checkpoint merges into on its base."""
    options = options or ResLoraOptions()
    options.check()
    checkpoint = reslora_format.read(checkpoint_path)
    rule = choose_rule(checkpoint.kind, options)
    base = open_base(base_ref)
    check_against_base(checkpoint, base)
    if rule.reads == OFFICIAL_WEIGHTS:
        _check_square(checkpoint)
    stats = read_stats(options.stats, checkpoint) if options.stats else None
    converted = _convert_chains(checkpoint, base, rule, stats, options.rank)
    pad_to = max(out.rank for _, out, _ in converted) if options.uniform_rank else None
    modules, reports = _plain_modules(checkpoint, converted, pad_to)
    estimator = estimator_text(rule, options, pad_to)
    architectures = base.config.get("architectures") or []
    causal = any(str(a).endswith("ForCausalLM") for a in architectures)
    adapter = Adapter(
        modules=modules,
        base_model=str(base_ref),
        source_format="reslora",
        source_path=checkpoint.source_path,
        task_type="CAUSAL_LM" if causal else None,
        metadata={"reslora.type": checkpoint.kind, "reslora.estimator": estimator},
    )
    return ResLoraConversion(checkpoint, adapter, reports, estimator)


def _check_square(checkpoint: ResLoraCheckpoint) -> None:
    for _, _, block in checkpoint.blocks():
        if block.shape[0] != block.shape[1]:
            raise OptionError(
                f"adds (B A)^T to W, defined only for square weights; this one is "
                f"{block.shape[0]} x {block.shape[1]}",
                module=block.path,
                option="norms",
                value="official",
                hint="use the default weight-based norms",
            )


_Converted = tuple[str, rules.PlainFactors, BlockReport]  # module path, factors, report


def _convert_chains(
    checkpoint: ResLoraCheckpoint,
    base: BaseModel,
    rule: Rule,
    stats: dict | None,
    rank: int | None,
) -> list[_Converted]:
    """Every block merged into a plain block by `rule` and turned into float32 factors (reduced
    to `rank` if given), chain by chain: the float64 factors of one chain at a time are held."""
    config = checkpoint.config
    converted: list[_Converted] = []
    with ExitStack() as stack:
        reader = _BaseReader(base, stack)
        for chain in checkpoint.chains:
            factors = _chain_factors(checkpoint, chain)
            data = _rule_data(rule, chain, factors, reader, stats)
            plain = rule.apply(factors, config.scale, config.pre_num, data)
            for n, (block, merged) in enumerate(zip(chain.blocks, plain, strict=True)):
                out = rules.plain_factors(merged, config.lora_alpha, config.rank, rank=rank)
                converted.append((block.path, out, _report(chain.name, n, block, merged, out)))
    return converted


def _report(
    chain: str, n: int, block: ResLoraBlock, plain: rules.PlainBlock, out: rules.PlainFactors
) -> BlockReport:
    return BlockReport(
        block.path,
        chain,
        n,
        block.layer,
        plain.rule,
        out.rank,
        out.alpha,
        plain.exact and out.relative_error == 0.0,
        dict(plain.coefficients),
        dict(plain.norms),
        list(plain.stacked),
        out.energy_kept,
        out.relative_error,
    )


def _chain_factors(checkpoint: ResLoraCheckpoint, chain: ResLoraChain) -> list:
    factors = [block.factors(torch.float64) for block in chain.blocks]
    for (B, A), block in zip(factors, chain.blocks, strict=True):
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            raise FormatError(
                "holds NaN or Inf values", file=checkpoint.source_path, module=block.path
            )
    return factors


def _rule_data(
    rule: Rule, chain: ResLoraChain, factors: list, reader: _BaseReader, stats: dict | None
) -> Any:
    """What the rule reads besides the factors, for every block of the chain."""
    paths = [block.path for block in chain.blocks]
    if rule.reads in (WEIGHTS, OFFICIAL_WEIGHTS):
        official = rule.reads == OFFICIAL_WEIGHTS
        return [
            reader.products(path, B, official) for path, (B, _) in zip(paths, factors, strict=True)
        ]
    assert stats is not None or rule.reads is None
    if rule.reads == INPUT_NORMS:
        return [stats[path]["input_norm"] for path in paths]
    if rule.reads == MIDDLE_NORMS:
        return [stats[path]["middle_norm"] for path in paths]
    return None


def _plain_modules(
    checkpoint: ResLoraCheckpoint, converted: list[_Converted], pad_to: int | None
) -> tuple[dict[str, LoraModule], list[BlockReport]]:
    """The adapter's modules, zero-padded to `pad_to` (exact) where asked."""
    config = checkpoint.config
    modules, reports = {}, []
    for path, out, report in converted:
        if pad_to is not None:
            out = rules.padded(out, pad_to, config.lora_alpha, config.rank)
            report.rank, report.alpha = out.rank, out.alpha
        modules[path] = LoraModule(path, LazyTensor.of(out.A), LazyTensor.of(out.B), out.alpha)
        reports.append(report)
    return modules, reports


class _BaseReader:
    """Base weights read in row tiles for the weight-based norms, one reader per shard."""

    def __init__(self, base: BaseModel, stack: ExitStack) -> None:
        self.base = base
        self.stack = stack
        self.located: dict[str, tuple[str, TensorEntry]] = base.locate()
        self.readers: dict[str, SafetensorsReader] = {}

    def products(self, path: str, B: torch.Tensor, official: bool) -> rules.BaseProducts:
        """||W||_F^2, B^T W and (official) W B for the base weight at `path`."""
        name = f"{path}.weight"
        shard, entry = self.located[name]
        if shard not in self.readers:
            reader = SafetensorsReader(self.base.shard_path(shard))
            self.readers[shard] = self.stack.enter_context(reader)
        reader = self.readers[shard]
        rows, cols = entry.shape
        tile = max(1, TILE_BYTES // (8 * cols))
        norm_sq = 0.0
        bt_w = torch.zeros(B.shape[1], cols, dtype=torch.float64)
        w_b = torch.zeros(rows, B.shape[1], dtype=torch.float64) if official else None
        widened = torch.empty(min(tile, rows), cols, dtype=torch.float64)
        squares = torch.empty_like(widened)
        for start in range(0, rows, tile):
            stop = min(rows, start + tile)
            w = widened[: stop - start]
            w.copy_(reader.read(name, rows=(start, stop)))
            norm_sq += float(torch.mul(w, w, out=squares[: stop - start]).sum())
            bt_w += B[start:stop].T @ w
            if w_b is not None:
                w_b[start:stop] = w @ B
        return rules.BaseProducts(norm_sq, bt_w, w_b)
