"""`loramerge merge`: an adapter merged into its base model, written as a model folder."""

from __future__ import annotations

from typing import Annotated

import typer
from loramerge_cli.common import (
    AllowNonfinite,
    Component,
    Debug,
    DyloraAlpha,
    Force,
    InputFormatOption,
    JsonOutput,
    MaxShardSize,
    OutDtype,
    Quiet,
    byte_progress,
    json_done,
    note,
    out_option,
    print_json,
    show,
)

# the options of `merge`, each with its help
AdapterArgument = Annotated[
    str,
    typer.Argument(metavar="ADAPTER", help="Adapter to merge (a path or a cached hub repo id)."),
]
BaseOption = Annotated[
    str,
    typer.Option("--base", "-b", metavar="BASE", help="Base model folder or cached hub repo id."),
]
OutOption = out_option("Folder to write the merged model to.")
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Print what would be written and write nothing.")
]


def merge(
    adapter: AdapterArgument,
    base: BaseOption,
    out: OutOption,
    dtype: OutDtype = None,
    max_shard_size: MaxShardSize = None,
    fmt: InputFormatOption = None,
    component: Component = None,
    alpha: DyloraAlpha = None,
    dry_run: DryRunOption = False,
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Merge ADAPTER into BASE and write a Hugging Face model folder to OUT.

    Touched tensors are computed in float32 from the upcast base and rounded once; untouched
    tensors are copied byte for byte.

    Example: loramerge merge fixtures/adapters/llama-lora --base fixtures/bases/llama -o merged
    """
    from loramerge.ops import torch_blas

    torch_blas.preload()  # the merge engine's BLAS loads while the rest is imported and planned
    from loramerge.jobs import merge as job

    options = {
        "fmt": fmt,
        "dtype": dtype,
        "max_shard_bytes": max_shard_size,
        "component": component,
        "alpha": alpha,
    }
    if dry_run:
        plan = job.preview(adapter, base, allow_nonfinite=allow_nonfinite, **options)
        _print_plan(plan, json_output, quiet)
        return
    with byte_progress("merging", quiet or json_output) as progress:
        result = job.merge(
            adapter,
            base,
            out,
            allow_nonfinite=allow_nonfinite,
            force=force,
            progress=progress,
            **options,
        )
    if json_done(result, json_output):
        return
    counts = result.plan.counts()
    show(
        f"wrote {result.out} ({len(result.plan.shards)} shard(s), "
        f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.2f} s): "
        f"{counts['merge']} merged, {counts['copy']} copied, {counts['cast']} cast, "
        f"{counts['replace']} replaced, {counts['bias']} biases",
        quiet,
    )
    if result.plan.untied:
        note("tied embeddings were untied: the merge changed one side of them", quiet)


def _print_plan(plan, json_output: bool, quiet: bool) -> None:
    rows = [
        {
            "shard": s.file_name,
            "tensor": t.name,
            "action": t.action.value,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "module": t.module,
        }
        for s in plan.shards
        for t in s.tensors
    ]
    if json_output:
        print_json({"tensors": rows, "config_updates": dict(plan.config_updates)})
        return
    from rich.table import Table

    table = Table("shard", "tensor", "action", "dtype", "shape", "module")
    for row in rows:
        if row["action"] != "copy":
            table.add_row(
                row["shard"],
                row["tensor"],
                row["action"],
                row["dtype"],
                str(row["shape"]),
                row["module"] or "",
            )
    show(table, quiet)
    show(
        f"{len(rows)} tensors, {plan.total_bytes / 1e6:.1f} MB; "
        f"config updates: {dict(plan.config_updates) or 'none'}",
        quiet,
    )
