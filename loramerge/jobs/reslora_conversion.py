"""A ResLoRA checkpoint on its base turned into a plain LoRA by the merge rules of docs/rules.md
section 4.

`convert_reslora` reads an official checkpoint, checks it against the base, applies the rule of
loramerge.ops.reslora_table that fits the checkpoint and the options, in layer order across the
chains, and returns a plain `Adapter` with module paths as in the base, whose factors are formed
from the checkpoint when they are read (loramerge.jobs.reslora_formed). The weight-based norms
read the base through loramerge.jobs.reslora_weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter, LoraModule
from loramerge.adapter_checks import nonfinite_count
from loramerge.errors import FormatError, OptionError
from loramerge.formats import reslora_checkpoint as reslora_format
from loramerge.formats.reslora_chains import ResLoraBlock, ResLoraChain, natural_order
from loramerge.formats.reslora_checkpoint import ResLoraCheckpoint
from loramerge.formats.reslora_config import ResLoraConfig
from loramerge.formats.reslora_stats import read_stats
from loramerge.jobs.reslora_formed import ChainFactors, FormedFactors
from loramerge.jobs.reslora_options import ResLoraOptions, choose_rule, estimator_text
from loramerge.jobs.reslora_weights import BaseWeights
from loramerge.model.folder import BaseModel, open_base
from loramerge.model.reslora_fit import check_against_base
from loramerge.model.stream_stats import Progress
from loramerge.ops import reslora_rules as rules
from loramerge.ops.reslora_forms import plain_factors, plain_size
from loramerge.ops.reslora_table import INPUT_NORMS, MIDDLE_NORMS, OFFICIAL_WEIGHTS, WEIGHTS, Rule


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
    bytes_read: int = 0  # of base weights, for the weight-based norms


def convert_reslora(
    checkpoint_path: str | Path,
    base_ref: str | Path,
    options: ResLoraOptions | None = None,
    progress: Progress | None = None,
) -> ResLoraConversion:
    """The plain LoRA that a ResLoRA checkpoint merges into on its base; `progress` follows the
    bytes of the base weights that the weight-based norms read."""
    options = options or ResLoraOptions()
    options.check()
    checkpoint = reslora_format.read(checkpoint_path)
    rule = choose_rule(checkpoint.kind, options)
    base = open_base(base_ref)
    check_against_base(checkpoint, base)
    if rule.reads == OFFICIAL_WEIGHTS:
        _check_square(checkpoint)
    stats = read_stats(options.stats, checkpoint) if options.stats else None
    converted, bytes_read = _convert_chains(checkpoint, base, rule, stats, options.rank, progress)
    pad_to = max(item.report.rank for item in converted) if options.uniform_rank else None
    modules = _plain_modules(checkpoint, converted, options.rank, pad_to)
    reports = [item.report for item in converted]
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
    return ResLoraConversion(checkpoint, adapter, reports, estimator, bytes_read)


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


@dataclass(frozen=True)
class _Converted:
    """One block's merge: its chain, what the rule decided (numbers only) and its report."""

    chain: ResLoraChain
    block: ResLoraBlock
    plain: rules.PlainBlock
    report: BlockReport


def _convert_chains(
    checkpoint: ResLoraCheckpoint,
    base: BaseModel,
    rule: Rule,
    stats: dict | None,
    rank: int | None,
    progress: Progress | None = None,
) -> tuple[list[_Converted], int]:
    """Every block merged into a plain block by `rule`, in layer order across the chains (the
    order of the base's files, so the weight-based norms read the base front to back; block n
    depends only on the blocks before it in its chain). Only numbers are kept: the rule reads
    each block's float64 factors where its norms need them, and a reduction to `rank` is
    computed here for its report and again when the factors are read. Returns them in the
    checkpoint's order, with the bytes of base weights read."""
    config = checkpoint.config
    decided: dict[tuple[str, int], _Converted] = {}
    with ExitStack() as stack:
        reads_weights = rule.reads in (WEIGHTS, OFFICIAL_WEIGHTS)
        paths = [block.path for _, _, block in checkpoint.blocks()] if reads_weights else []
        reader = BaseWeights(base, stack, paths, progress)
        chains = {}
        for chain in checkpoint.chains:
            factors = ChainFactors(chain)
            _check_finite(checkpoint, chain)
            data = _rule_data(rule, factors, reader, stats)
            chains[chain.name] = (factors, rule.apply(factors, config.scale, config.pre_num, data))
        for chain, n, block in sorted(checkpoint.blocks(), key=lambda b: natural_order(b[2].path)):
            factors, plain = chains[chain.name]
            merged = next(plain)
            report = _report(chain.name, n, block, merged, config, rank, factors)
            decided[(chain.name, n)] = _Converted(chain, block, merged, report)
    return [decided[(chain.name, n)] for chain, n, _ in checkpoint.blocks()], reader.done


def _report(
    chain: str,
    n: int,
    block: ResLoraBlock,
    plain: rules.PlainBlock,
    config: ResLoraConfig,
    rank: int | None,
    factors: ChainFactors,
) -> BlockReport:
    """The block's report; a reduction to `rank` is computed for its energy and error."""
    written, alpha = plain_size(
        plain.form.rank(block.rank), config.lora_alpha, config.rank, rank=rank
    )
    energy_kept, relative_error = 1.0, 0.0
    if rank is not None:
        formed = plain.form.factors(factors)
        out = plain_factors(formed, plain.scale, config.lora_alpha, config.rank, rank=rank)
        energy_kept, relative_error = out.energy_kept, out.relative_error
    return BlockReport(
        block.path,
        chain,
        n,
        block.layer,
        plain.rule,
        written,
        alpha,
        plain.exact and relative_error == 0.0,
        dict(plain.coefficients),
        dict(plain.norms),
        list(plain.stacked),
        energy_kept,
        relative_error,
    )


def _check_finite(checkpoint: ResLoraCheckpoint, chain: ResLoraChain) -> None:
    """Every block's stored factors checked (none kept): widening never makes one non-finite."""
    for block in chain.blocks:
        if any(nonfinite_count(factor) for pair in block.loras for factor in pair):
            raise FormatError(
                "holds NaN or Inf values", file=checkpoint.source_path, module=block.path
            )


def _rule_data(rule: Rule, factors: ChainFactors, reader: BaseWeights, stats: dict | None) -> Any:
    """What the rule reads besides the factors, for every block of the chain."""
    paths = [block.path for block in factors.chain.blocks]
    if rule.reads in (WEIGHTS, OFFICIAL_WEIGHTS):
        return _ChainProducts(reader, factors, rule.reads == OFFICIAL_WEIGHTS)
    assert stats is not None or rule.reads is None
    if rule.reads == INPUT_NORMS:
        return [stats[path]["input_norm"] for path in paths]
    if rule.reads == MIDDLE_NORMS:
        return [stats[path]["middle_norm"] for path in paths]
    return None


def _plain_modules(
    checkpoint: ResLoraCheckpoint,
    converted: list[_Converted],
    rank: int | None,
    pad_to: int | None,
) -> dict[str, LoraModule]:
    """The adapter's modules, whose factors are formed when read (zero-padded to `pad_to`,
    exact, where asked); the reports follow the padding."""
    config = checkpoint.config
    formed = FormedFactors(config, rank=rank, pad_to=pad_to)
    modules = {}
    for item in converted:
        if pad_to is not None:
            report = item.report
            size = plain_size(report.rank, config.lora_alpha, config.rank, pad_to=pad_to)
            report.rank, report.alpha = size
        out_features, in_features = item.block.shape
        r = item.report.rank
        lora_a, lora_b = (
            formed.lazy(item.chain, item.plain, part, shape)
            for part, shape in (("A", (r, in_features)), ("B", (out_features, r)))
        )
        modules[item.block.path] = LoraModule(item.block.path, lora_a, lora_b, item.report.alpha)
    return modules


class _ChainProducts(Sequence[rules.BaseProducts]):
    """The base products of every block of a chain, read from the base when indexed."""

    def __init__(self, reader: BaseWeights, factors: ChainFactors, official: bool) -> None:
        self.reader, self.factors, self.official = reader, factors, official

    def __len__(self) -> int:
        return len(self.factors)

    def __getitem__(self, n: int) -> rules.BaseProducts:  # type: ignore[override]
        path = self.factors.chain.blocks[n].path
        return self.reader.products(path, self.factors[n][0], self.official)
