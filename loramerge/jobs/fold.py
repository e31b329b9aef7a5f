"""Folding a COLA chain: checks, then the merged model (rounded once or per link) or one adapter."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter
from loramerge.adapter_checks import check_adapter
from loramerge.errors import FormatError, LoramergeError, UsageError, opt
from loramerge.formats.cola_chain import Chain, ChainLink, in_link, read_chain
from loramerge.formats.registry import ReadOptions
from loramerge.io.atomic import TEMP_MARK, check_output_target, remove_path
from loramerge.io.dtypes import output_code
from loramerge.io.safetensors_header import torch_dtype
from loramerge.jobs.adapter_output import check_adapter_output, choose_output, write_adapter
from loramerge.jobs.defaults import ROUNDINGS
from loramerge.jobs.fold_report import LinkReport, base_model_warnings, knot_warnings, link_reports
from loramerge.jobs.merge import MergeResult, merge_adapter
from loramerge.jobs.options import check_choice, check_rank, exclusive, needs
from loramerge.model.fit import rename_to_base
from loramerge.model.folder import BaseModel, open_base
from loramerge.model.names import resolve_tensor_name
from loramerge.model.plan import Action, plan_merge
from loramerge.model.stream import Progress
from loramerge.ops.cola_fold import (
    FoldedAdapter,
    check_compatible,
    fold_chain,
    weighted,
)


@dataclass
class FoldResult:
    out: Path
    links: list[LinkReport]
    chain_norms: dict[str, float]  # ||sum_j w_j s_j B_j A_j||_F per module
    rounding: str | None = None  # None when an adapter was written
    merge: MergeResult | None = None  # the (last) merge of the folded model
    folded: FoldedAdapter | None = None  # the adapter written (as_lora)
    bytes_written: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # output tensors by action
    warnings: list[str] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)  # the engine profile's report
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "out": str(self.out),
            "kind": "adapter" if self.folded is not None else "model",
            "rounding": self.rounding,
            "seconds": round(self.seconds, 3),
            "links": [link.to_json() for link in self.links],
            "chain_update_norm": dict(self.chain_norms),
            "warnings": self.warnings,
        }
        if self.merge is not None:
            summary["bytes"] = self.bytes_written
            summary["shards"] = [s.file_name for s in self.merge.plan.shards]
            summary["tensors"] = self.counts
            if self.rounding == "once":
                summary["changed_share"] = {
                    name: stats.changed_share for name, stats in self.merge.modules.items()
                }
        if self.folded is not None:
            summary["energy_kept"] = self.folded.energy_kept
            summary["modules"] = {
                path: {
                    "rank": m.rank,
                    "link_ranks": list(m.link_ranks),
                    "energy_kept": m.energy_kept,
                    "relative_error": m.relative_error,
                }
                for path, m in self.folded.modules.items()
            }
        if self.engine:
            summary["engine"] = self.engine
        return summary


@dataclass(frozen=True)
class FoldOptions:
    """How to fold: into the base with `rounding`, or `as_lora` into one adapter (at most
    `rank` per module, for `engine`); `dtype` and `max_shard_bytes` of what is written."""

    rounding: str = "once"
    as_lora: bool = False
    rank: int | None = None
    engine: str | None = None
    dtype: str | None = None
    max_shard_bytes: int | None = None

    def check(self, base: str | Path | None) -> None:
        """Every check that needs no input: values in range, options that fit together."""
        check_choice(self.rounding, ROUNDINGS, "rounding")
        output_code(self.dtype)
        needs("engine", self.engine is not None, "as_lora", self.as_lora, "it rewrites an adapter")
        exclusive("rounding", self.rounding != "once", "as_lora", self.as_lora)
        exclusive("max_shard_size", self.max_shard_bytes is not None, "as_lora", self.as_lora)
        needs("rank", self.rank is not None, "as_lora", self.as_lora, "it compresses the adapter")
        if self.rank is not None:
            check_rank(self.rank)
        if base is None and not self.as_lora:
            raise UsageError(
                f"is needed to fold a chain into a model (or write one adapter: {opt('as_lora')})",
                option="base",
            )


def fold(
    links: Sequence[str | Path],
    out: str | Path,
    options: FoldOptions,
    *,
    base: str | Path | None = None,
    allow_nonfinite: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> FoldResult:
    """The `fold` command: check the options, read and check the chain, write OUT."""
    options.check(base)
    started = time.perf_counter()
    chain, warnings = load_chain(links, base, allow_nonfinite=allow_nonfinite)
    if options.as_lora:
        result = fold_to_adapter(
            chain,
            out,
            rank=options.rank,
            dtype=options.dtype,
            force=force,
            engine=options.engine,
            base=base,
        )
    else:
        assert base is not None
        result = fold_to_model(
            chain,
            base,
            out,
            rounding=options.rounding,
            dtype=options.dtype,
            force=force,
            max_shard_bytes=options.max_shard_bytes,
            progress=progress,
        )
    result.warnings = warnings + result.warnings
    result.seconds = time.perf_counter() - started
    return result


def load_chain(
    paths: Sequence[str | Path],
    base_ref: str | Path | None = None,
    *,
    fmt: str | None = None,
    options: ReadOptions | None = None,
    allow_nonfinite: bool = False,
) -> tuple[Chain, list[str]]:
    """Read and check every link; with a base, plan each against it (names pinned to the base).

    Returns the chain and warnings (links naming different base models).
    """
    chain = read_chain(paths, fmt=fmt, options=options)
    base = open_base(base_ref) if base_ref is not None else None
    for link in chain.links:
        try:
            link.adapter = _checked(link, base, allow_nonfinite)
        except LoramergeError as exc:
            raise in_link(exc, link.index) from exc
    # without a base this is the only shape check; with one it cannot fail after the plans
    check_compatible([(link.adapter, link.weight) for link in chain.links])
    return chain, base_model_warnings(chain)


def _checked(link: ChainLink, base: BaseModel | None, allow_nonfinite: bool) -> Adapter:
    adapter = link.adapter
    check_adapter(adapter, allow_nonfinite)
    dora = [m.path for m in adapter.modules.values() if m.magnitude is not None]
    if dora:
        raise FormatError(
            "is a DoRA adapter; DoRA updates do not add up, so a chain of them cannot be folded",
            file=adapter.source_path,
            module=dora[0],
            hint="merge DoRA links one at a time with loramerge merge",
        )
    if adapter.modules_to_save:
        name = next(iter(adapter.modules_to_save))
        raise FormatError(
            f"carries a full trained tensor ({name}, modules_to_save); only plain LoRA links "
            "can be folded",
            file=adapter.source_path,
            hint="merge this link with loramerge merge instead",
        )
    if not adapter.modules:
        raise FormatError("holds no LoRA modules", file=adapter.source_path)
    if base is None:
        # saved base tables are the weights the link was trained on (earlier knots included);
        # the fold starts from the base instead
        return replace(adapter, base_tables={})
    adapter = rename_to_base(adapter, base.root)
    shapes = {entry.name: entry.shape for _, entry in base.tensors()}
    for name, table in adapter.base_tables.items():
        found = resolve_tensor_name(name, shapes)
        if found is not None and tuple(table.shape) != tuple(shapes[found]):
            raise FormatError(
                f"saved base table {name} is {list(table.shape)}, the base has "
                f"{list(shapes[found])}: tokens were added while training this link",
                file=adapter.source_path,
                hint="a chain whose vocabulary grows cannot be folded; merge link by link",
            )
    adapter = replace(adapter, base_tables={})
    # the merge planner's own checks: every module's shape against its base tensor
    plan_merge(base.tensors(), base.config, adapter)
    return adapter


def fold_to_model(
    chain: Chain,
    base_ref: str | Path,
    out: str | Path,
    *,
    rounding: str = "once",
    dtype: str | None = None,
    force: bool = False,
    max_shard_bytes: int | None = None,
    progress: Progress | None = None,
) -> FoldResult:
    """Write the base with the whole chain merged into `out` (a model folder).

    `once`: W_0 + sum_j w_j s_j B_j A_j in float32, rounded once (one streamed merge of the exact
    concatenated adapter). `per-link`: W_j = round(float32(W_{j-1}) + float32(w_j s_j B_j A_j)),
    one streamed merge per link, each knot rounded to the output dtype, as tying each knot with
    PEFT's merge_and_unload in that dtype does.
    """
    check_choice(rounding, ROUNDINGS, "rounding")
    output_code(dtype)
    out = Path(out)
    base = open_base(base_ref)
    check_output_target(out, [base.root, *chain.inputs], force)
    reports, chain_norms = link_reports(chain)
    result = FoldResult(out, reports, chain_norms, rounding=rounding)
    if rounding == "once":
        folded = fold_chain([(link.adapter, link.weight) for link in chain.links])
        merged = merge_adapter(
            folded.adapter,
            base.root,
            out,
            dtype=dtype,
            force=force,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
            extra_inputs=chain.inputs,
        )
        result.warnings += merged.warnings
        result.counts = merged.plan.counts()
    else:
        steps = _merge_link_by_link(
            chain, base, out, result, dtype, force, max_shard_bytes, progress
        )
        merged = steps[-1]
        result.counts = _chain_counts(steps)
        result.warnings += knot_warnings(result.links, dtype)
    result.merge = merged
    result.bytes_written = merged.bytes_written
    return result


def _merge_link_by_link(
    chain: Chain,
    base: BaseModel,
    out: Path,
    result: FoldResult,
    dtype: str | None,
    force: bool,
    max_shard_bytes: int | None,
    progress: Progress | None,
) -> list[MergeResult]:
    """Merge link 1 into a temporary folder beside `out`, link 2 on top of it, ..., the last link
    into `out` (atomically); the temporary folders are removed whatever happens."""
    # named like atomic_output's temporaries, so a run that was killed is cleaned up later
    scratch = out.parent / f".{out.name}{TEMP_MARK}{os.getpid()}-links"
    remove_path(scratch)
    total = len(chain.links)
    previous: Path = base.root
    steps: list[MergeResult] = []
    try:
        for step, link in enumerate(chain.links):
            last = step == total - 1
            target = out if last else scratch / f"link-{link.index}"
            merged = merge_adapter(
                weighted(link.adapter, link.weight),
                previous,
                target,
                dtype=dtype,
                force=force if last else False,
                max_shard_bytes=max_shard_bytes,
                progress=_step_progress(progress, step, total),
                extra_inputs=[base.root, *chain.inputs],
            )
            report = result.links[step]
            for path, stats in merged.modules.items():
                report.modules[path].changed_share = stats.changed_share
                report.modules[path].elements = stats.elements
            steps.append(merged)
            if previous != base.root:
                remove_path(previous)  # two copies on disk at most
            previous = target
    finally:
        remove_path(scratch)
    return steps


def _chain_counts(steps: list[MergeResult]) -> dict[str, int]:
    """Output tensors by what the chain did to them: merged (or bias-updated) by any link, cast
    by the first step's dtype change, else copied."""
    touched: dict[str, set[str]] = {action.value: set() for action in Action}
    for step in steps:
        for shard in step.plan.shards:
            for tensor in shard.tensors:
                touched[tensor.action.value].add(tensor.name)
    changed = touched[Action.MERGE.value] | touched[Action.BIAS.value]
    total = sum(len(shard.tensors) for shard in steps[-1].plan.shards)
    counts = {action.value: 0 for action in Action}
    counts[Action.MERGE.value] = len(touched[Action.MERGE.value])
    counts[Action.BIAS.value] = len(touched[Action.BIAS.value] - touched[Action.MERGE.value])
    counts[Action.CAST.value] = len(touched[Action.CAST.value] - changed)
    counts[Action.COPY.value] = total - sum(counts.values())
    return counts


def _step_progress(progress: Progress | None, step: int, total: int) -> Progress | None:
    if progress is None:
        return None

    def update(done: int, size: int) -> None:
        progress(step * size + done, total * size)

    return update


def fold_to_adapter(
    chain: Chain,
    out: str | Path,
    *,
    rank: int | None = None,
    dtype: str | None = None,
    force: bool = False,
    engine: str | None = None,
    base: str | Path | None = None,
) -> FoldResult:
    """Write one PEFT adapter equal to the whole chain: exact, or reduced to `rank`.

    `engine` rewrites it for an inference engine first (see write_adapter); the result's
    `engine` holds what that changed.
    """
    code = output_code(dtype or "float32")
    out = Path(out)
    output = choose_output(None, engine, base)
    check_adapter_output(out, output, chain.inputs, force)
    reports, chain_norms = link_reports(chain)
    folded = fold_chain(
        [(link.adapter, link.weight) for link in chain.links], rank=rank, dtype=torch_dtype(code)
    )
    engine_report = write_adapter(folded.adapter, out, output, force=force, inputs=chain.inputs)
    return FoldResult(out, reports, chain_norms, folded=folded, engine=engine_report)
