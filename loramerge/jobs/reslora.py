"""ResLoRA checkpoint + base -> plain LoRA, by the merge rules of rules.md section 4.

`convert_reslora` reads an official checkpoint, checks it against the base, applies the merge
rules chain by chain (loramerge.ops.reslora_rules) and returns a plain `Adapter` with module
paths as in the base, ready for `write_adapter` or `merge_adapter`. The ResLoRA forward that
measures statistics and merge loss is run by loramerge.jobs.reslora_stats.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule
from loramerge.errors import FormatError, OptionError, ShapeMismatchError
from loramerge.formats import reslora_checkpoint as reslora_format
from loramerge.formats.reslora_checkpoint import ResLoraCheckpoint
from loramerge.formats.reslora_stats import read_stats
from loramerge.io.safetensors_header import TensorEntry
from loramerge.io.safetensors_reader import SafetensorsReader
from loramerge.model.folder import BaseModel, open_base
from loramerge.ops import reslora_rules as rules

NORMS = ("weights", "official", "inputs")
MS_RULES = ("amerge", "scalar")
TILE_BYTES = 32 << 20  # float64 bytes of base rows read at a time for the norms


@dataclass(frozen=True)
class ResLoraOptions:
    """How to merge: `norms` None means "inputs" when `stats` is given, else "weights"."""

    norms: str | None = None
    stats: Path | None = None
    ms_rule: str = "amerge"
    rank: int | None = None
    uniform_rank: bool = False


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


def resolve_estimator(kind: str, options: ResLoraOptions) -> str:
    """The norm source a checkpoint type uses under these options; refuses contradictions."""
    if options.norms is not None and options.norms not in NORMS:
        raise OptionError(f"unknown --norms {options.norms!r}; choose one of {', '.join(NORMS)}")
    if options.ms_rule not in MS_RULES:
        raise OptionError(f"unknown --ms-rule {options.ms_rule!r}; choose amerge or scalar")
    if options.rank is not None and options.uniform_rank:
        raise OptionError("--rank and --uniform-rank exclude each other", hint="pick one")
    if options.rank is not None and options.rank < 1:
        raise OptionError(f"--rank must be at least 1, got {options.rank}")
    norms = options.norms or ("inputs" if options.stats else "weights")
    if norms == "inputs" and options.stats is None:
        raise OptionError("--norms inputs needs --stats FILE", hint="make one with reslora-stats")
    if options.stats is not None and norms != "inputs":
        raise OptionError(
            f"--stats gives input norms but --norms is {norms}", hint="drop one of the two"
        )
    if kind in ("bs", "none"):
        given = [
            name
            for name, value in (("--norms", options.norms), ("--stats", options.stats))
            if value
        ]
        if options.ms_rule != "amerge":
            given.append("--ms-rule")
        if given:
            raise OptionError(f"{given[0]} does not apply: {kind} blocks merge exactly")
        return "exact"
    if norms == "official" and kind != "is":
        raise OptionError("--norms official applies to input-shortcut (is) checkpoints only")
    if kind == "ms" and options.ms_rule == "scalar":
        if options.stats is None:
            raise OptionError("--ms-rule scalar needs --stats FILE (middle-vector norms)")
        return "scalar rule from middle-vector norms"
    if kind != "ms" and options.ms_rule != "amerge":
        raise OptionError("--ms-rule applies to middle-shortcut (ms) checkpoints only")
    return {
        "weights": "weight-based norms",
        "official": "official-code norms",
        "inputs": "input norms",
    }[norms]


def convert_reslora(
    checkpoint_path: str | Path, base_ref: str | Path, options: ResLoraOptions | None = None
) -> ResLoraConversion:
    """The plain LoRA that a ResLoRA checkpoint merges into on its base."""
    options = options or ResLoraOptions()
    checkpoint = reslora_format.read(checkpoint_path)
    estimator = resolve_estimator(checkpoint.kind, options)
    base = open_base(base_ref)
    check_against_base(checkpoint, base)
    norms = options.norms or ("inputs" if options.stats else "weights")
    if norms == "official" and checkpoint.kind == "is":
        for _, _, block in checkpoint.blocks():
            if block.shape[0] != block.shape[1]:
                raise OptionError(
                    f"--norms official adds (B A)^T to W, defined only for square weights; this "
                    f"one is {block.shape[0]} x {block.shape[1]}",
                    module=block.path,
                    hint="use the default weight-based norms",
                )
    stats = read_stats(options.stats, checkpoint) if options.stats else None
    config = checkpoint.config
    merged: list[tuple[str, int, Any, rules.PlainBlock]] = []
    located = base.locate()
    with ExitStack() as stack:
        readers: dict[str, SafetensorsReader] = {}
        for chain in checkpoint.chains:
            factors = [block.factors(torch.float64) for block in chain.blocks]
            for (B, A), block in zip(factors, chain.blocks, strict=True):
                if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
                    raise FormatError(
                        "holds NaN or Inf values", path=checkpoint.source_path, module=block.path
                    )
            paths = [block.path for block in chain.blocks]

            def products(official: bool, paths=paths, factors=factors) -> list:
                return [
                    base_products(base, located, readers, stack, path, B, official)
                    for path, (B, _) in zip(paths, factors, strict=True)
                ]

            plain = _apply_rule(checkpoint, factors, norms, options, stats, paths, products)
            merged += [(chain.name, n, chain.blocks[n], p) for n, p in enumerate(plain)]
    pad_to = max(p.A.shape[0] for *_, p in merged) if options.uniform_rank else None
    modules, reports = {}, []
    for chain_name, n, block, plain in merged:
        out = rules.plain_factors(
            plain, config.lora_alpha, config.rank, rank=options.rank, pad_to=pad_to
        )
        modules[block.path] = LoraModule(
            block.path, LazyTensor.of(out.A), LazyTensor.of(out.B), out.alpha
        )
        reports.append(
            BlockReport(
                block.path,
                chain_name,
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
        )
    if options.rank is not None:
        estimator += f", compressed to rank {options.rank} (QR-core SVD)"
    elif pad_to is not None:
        estimator += f", zero-padded to rank {pad_to}"
    architectures = base.config.get("architectures") or []
    causal = any(str(a).endswith("ForCausalLM") for a in architectures)
    adapter = Adapter(
        modules=modules,
        base_model=str(base_ref),
        source_format="reslora",
        source_path=str(checkpoint_path),
        task_type="CAUSAL_LM" if causal else None,
        metadata={"reslora.type": checkpoint.kind, "reslora.estimator": estimator},
    )
    return ResLoraConversion(checkpoint, adapter, reports, estimator)


def _apply_rule(checkpoint, factors, norms, options, stats, paths, products):
    config = checkpoint.config
    s, kind = config.scale, checkpoint.kind
    if kind == "none":
        return rules.merge_none(factors, s)
    if kind == "bs":
        return rules.merge_bs(factors, s, config.pre_num)
    if kind == "is":
        if norms == "inputs":
            return rules.merge_is_inputs(factors, s, [stats[p]["input_norm"] for p in paths])
        if norms == "official":
            return rules.merge_is_official(factors, s, products(True))
        return rules.merge_is_weights(factors, s, products(False))
    if options.ms_rule == "scalar":
        middle = [stats[p]["middle_norm"] for p in paths]
        return rules.merge_ms_scalar(factors, s, config.pre_num, middle)
    if norms == "inputs":
        inputs = [stats[p]["input_norm"] for p in paths]
        return rules.merge_ms_amerge_inputs(factors, s, config.pre_num, inputs)
    return rules.merge_ms_amerge_weights(factors, s, config.pre_num, products(False))


def base_products(
    base: BaseModel,
    located: dict[str, tuple[str, TensorEntry]],
    readers: dict[str, SafetensorsReader],
    stack: ExitStack,
    path: str,
    B: torch.Tensor,
    official: bool,
) -> rules.BaseProducts:
    """||W||_F^2, B^T W and (official) W B for the base weight at `path`, read in row tiles."""
    name = f"{path}.weight"
    shard, entry = located[name]
    if shard not in readers:
        readers[shard] = stack.enter_context(SafetensorsReader(base.shard_path(shard)))
    reader = readers[shard]
    rows, cols = entry.shape
    tile = max(1, TILE_BYTES // (8 * cols))
    norm_sq = 0.0
    bt_w = torch.zeros(B.shape[1], cols, dtype=torch.float64)
    w_b = torch.zeros(rows, B.shape[1], dtype=torch.float64) if official else None
    for start in range(0, rows, tile):
        stop = min(rows, start + tile)
        w = reader.read(name, rows=(start, stop)).to(torch.float64)
        norm_sq += float((w * w).sum())
        bt_w += B[start:stop].T @ w
        if w_b is not None:
            w_b[start:stop] = w @ B
    return rules.BaseProducts(norm_sq, bt_w, w_b)


def check_against_base(checkpoint: ResLoraCheckpoint, base: BaseModel) -> None:
    """Every block fits its base weight, and every base linear of a chain's name has a block."""
    located = base.locate()
    groups: dict[str, list] = {}
    for _, _, block in checkpoint.blocks():
        groups.setdefault(block.name, []).append(block)
    for name, blocks in groups.items():
        for block in blocks:
            if f"{block.path}.weight" not in located:
                raise ShapeMismatchError(
                    f"the base has no tensor {block.path}.weight",
                    path=base.root,
                    module=block.path,
                    hint="pass the base model the ResLoRA checkpoint was trained on",
                )
        blocks = sorted(blocks, key=lambda b: reslora_format.natural_order(b.path))
        for before, block in zip([None, *blocks], blocks, strict=False):
            shape = tuple(located[f"{block.path}.weight"][1].shape)
            if shape == block.shape:
                continue
            where = ""
            if before is not None and before.shape != block.shape:
                where = (
                    f" (the {name} factors change shape between {before.path} and this layer, "
                    "while the base weights do not)"
                )
            raise ShapeMismatchError(
                f"the factors make a {block.shape[0]} x {block.shape[1]} update but the base "
                f"weight is {' x '.join(map(str, shape))}{where}",
                path=checkpoint.source_path,
                module=block.path,
                hint="the checkpoint does not belong to this base, or it is damaged",
            )
        covered = {block.path for block in blocks}
        for tensor, (_, entry) in located.items():
            path = tensor.removesuffix(".weight")
            if (
                tensor.endswith(".weight")
                and len(entry.shape) == 2
                and path.rsplit(".", 1)[-1] == name
                and path not in covered
            ):
                raise FormatError(
                    f"has no block for {path}, which the base has: the {name} chain is "
                    "missing a block",
                    path=checkpoint.source_path,
                    hint="ResLoRA wraps every linear of a target name; the file is incomplete",
                )
