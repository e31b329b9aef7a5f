"""`loramerge merge`: an adapter merged into its base model, written as a model folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from loramerge_cli.common import (
    AllowNonfinite,
    Debug,
    DyloraAlpha,
    Force,
    InputFormatOption,
    JsonOutput,
    MaxShardSize,
    OutDtype,
    Quiet,
    byte_progress,
    note,
    parse_size,
    print_json,
    stdout,
    user_errors,
    warn,
)


def merge(
    adapter: Annotated[
        Path, typer.Argument(help="Adapter to merge: a PEFT folder or a kohya file.")
    ],
    base: Annotated[
        str, typer.Option("--base", "-b", help="Base model folder or cached hub repo id.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the merged model to.")],
    dtype: OutDtype = None,
    max_shard_size: MaxShardSize = None,
    fmt: InputFormatOption = None,
    alpha: DyloraAlpha = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be written and write nothing.")
    ] = False,
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
    with user_errors(debug):
        from loramerge.adapter_checks import check_adapter
        from loramerge.formats.registry import ReadOptions, check_user_alpha, read_adapter
        from loramerge.jobs.merge import dtype_code_of, merge_adapter, preview_merge

        shard_bytes = parse_size(max_shard_size)
        dtype_code_of(dtype)
        loaded = read_adapter(adapter, fmt, ReadOptions(alpha=alpha, base=base))
        check_user_alpha(loaded, alpha, adapter)
        check_adapter(loaded, allow_nonfinite)
        dtype_name = dtype
        if dry_run:
            plan = preview_merge(loaded, base, dtype=dtype_name, max_shard_bytes=shard_bytes)
            _print_plan(plan, json_output)
            return
        started = time.perf_counter()
        with byte_progress("merging", quiet or json_output) as progress:
            result = merge_adapter(
                loaded,
                base,
                out,
                dtype=dtype_name,
                force=force,
                max_shard_bytes=shard_bytes,
                progress=progress,
            )
        seconds = time.perf_counter() - started
        counts = result.plan.counts()
        summary = {
            "out": str(result.out),
            "shards": [s.file_name for s in result.plan.shards],
            "bytes": result.bytes_written,
            "seconds": round(seconds, 3),
            "tensors": counts,
            "untied_embeddings": result.plan.untied,
            "modules": {
                name: {"tensor": s.tensor, "changed_share": round(s.changed_share, 6)}
                for name, s in result.modules.items()
            },
            "warnings": result.warnings,
        }
        if json_output:
            print_json(summary)
            return
        for message in result.warnings:
            warn(message, quiet)
        stdout.print(
            f"wrote {result.out} ({len(summary['shards'])} shard(s), "
            f"{result.bytes_written / 1e6:.1f} MB in {seconds:.2f} s): "
            f"{counts['merge']} merged, {counts['copy']} copied, {counts['cast']} cast, "
            f"{counts['replace']} replaced, {counts['bias']} biases"
        )
        if result.plan.untied:
            note("tied embeddings were untied: the merge changed one side of them", quiet)


def _print_plan(plan, json_output: bool) -> None:
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
    stdout.print(table)
    stdout.print(
        f"{len(rows)} tensors, {plan.total_bytes / 1e6:.1f} MB; "
        f"config updates: {dict(plan.config_updates) or 'none'}"
    )
