"""Folding a COLA chain into the base model: rounded once (one merge of the concatenated
adapter) or per link (one merge per link through temporary knots)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loramerge.adapter import Adapter
from loramerge.formats.cola_chain import Chain
from loramerge.io.atomic import TEMP_MARK, check_output_target, remove_path
from loramerge.io.dtypes import output_code
from loramerge.jobs.defaults import ROUNDINGS
from loramerge.jobs.fold_report import FoldResult, knot_warnings, link_reports
from loramerge.jobs.merge import MergeResult, merge_adapter
from loramerge.jobs.options import check_choice
from loramerge.model.folder import BaseModel, open_base
from loramerge.model.plan import Action
from loramerge.model.stream_stats import Progress
from loramerge.ops.cola_links import concatenated, weighted


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
    folded = _exact_fold(chain) if rounding == "once" else None
    # the report's norms (a QR of every link's modules) need nothing the merge writes: they
    # are measured on a thread of their own while the base streams. That thread imports torch,
    # holding the GIL for most of a second, which the stream's long numpy and BLAS steps
    # mostly do without (docs/performance.md: what it still costs the stream)
    with ThreadPoolExecutor(1, thread_name_prefix="loramerge-fold-norms") as pool:
        measured = pool.submit(link_reports, chain)
        if folded is not None:
            steps = [
                merge_adapter(
                    folded,
                    base.root,
                    out,
                    dtype=dtype,
                    force=force,
                    max_shard_bytes=max_shard_bytes,
                    progress=progress,
                    extra_inputs=chain.inputs,
                )
            ]
        else:
            steps = _merge_link_by_link(chain, base, out, dtype, force, max_shard_bytes, progress)
        reports, chain_norms = measured.result()
    return _result(FoldResult(out, reports, chain_norms, rounding=rounding), steps, dtype)


def _result(result: FoldResult, steps: list[MergeResult], dtype: str | None) -> FoldResult:
    """The fold's result from its merges: the one merge rounded once, or every link's."""
    merged = result.merge = steps[-1]
    result.bytes_written = merged.bytes_written
    if result.rounding == "once":
        result.warnings += merged.warnings
        result.counts = merged.plan.counts()
        return result
    for report, step in zip(result.links, steps, strict=True):
        for path, stats in step.modules.items():
            report.modules[path].changed_share = stats.changed_share
            report.modules[path].elements = stats.elements
    result.counts = _chain_counts(steps)
    result.warnings += knot_warnings(result.links, dtype)
    return result


def _exact_fold(chain: Chain) -> Adapter:
    """The chain as one exact adapter: with numpy where it can be (no torch to wait for), else
    with torch."""
    links = [(link.adapter, link.weight) for link in chain.links]
    found = concatenated(links)
    if found is not None:
        return found
    from loramerge.ops.cola_fold import fold_chain

    return fold_chain(links, measure=False).adapter


def _merge_link_by_link(
    chain: Chain,
    base: BaseModel,
    out: Path,
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
