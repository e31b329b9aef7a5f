"""`loramerge truncate`: a DyLoRA adapter cut to a rank, or any LoRA reduced by SVD."""

from __future__ import annotations

from typing import Annotated

import typer
from loramerge_cli.common import (
    AllowNonfinite,
    BaseOption,
    Debug,
    DyloraAlpha,
    Engine,
    Force,
    InputFormatOption,
    JsonOutput,
    OutDtype,
    Quiet,
    Ranks,
    byte_progress,
    choices,
    json_done,
    out_option,
    parse_ranks,
    print_engine_report,
    stdout,
)

from loramerge.formats.registry import OUTPUT_FORMAT_NAMES
from loramerge.jobs.defaults import TRUNCATE_METHODS

# the options of `truncate`, each with its help
AdapterArgument = Annotated[
    str,
    typer.Argument(
        metavar="ADAPTER",
        help="Adapter: DyLoRA (official or kohya), PEFT folder or kohya file (a path or a "
        "cached hub repo id).",
    ),
]
OutOption = out_option("Output; with several ranks a folder holding one per rank.")
RankOption = Annotated[
    Ranks | None,
    typer.Option(
        "--rank",
        "-r",
        metavar="B[,B...]",
        parser=parse_ranks,
        help="Target rank B, or a list like 4,8,16.",
    ),
]
MethodOption = Annotated[
    str | None,
    typer.Option(
        "--method",
        metavar=choices(TRUNCATE_METHODS),
        help="prefix (DyLoRA's trained first ranks; default for DyLoRA inputs), svd "
        "(optimal reduction; default otherwise) or dylora (prefix, declaring a PEFT "
        "adapter to be DyLoRA).",
    ),
]
EnergyOption = Annotated[
    float | None,
    typer.Option(
        "--energy",
        help="Instead of --rank: give each module the smallest rank keeping this share "
        "of its update's energy, e.g. 0.9 (SVD).",
    ),
]
MaxRankOption = Annotated[
    int | None, typer.Option("--max-rank", help="Cap on the ranks --energy chooses.")
]
ToOption = Annotated[
    str | None,
    typer.Option(
        "--to",
        metavar=choices(OUTPUT_FORMAT_NAMES),
        help="Output format (default: kohya for kohya inputs, else peft).",
    ),
]
MergeOption = Annotated[
    bool,
    typer.Option("--merge", help="Write the merged model (needs --base) instead of an adapter."),
]


def truncate(
    adapter: AdapterArgument,
    out: OutOption,
    rank: RankOption = None,
    method: MethodOption = None,
    energy: EnergyOption = None,
    max_rank: MaxRankOption = None,
    alpha: DyloraAlpha = None,
    to: ToOption = None,
    base: BaseOption = None,
    engine: Engine = None,
    merge: MergeOption = False,
    dtype: OutDtype = None,
    fmt: InputFormatOption = None,
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Cut ADAPTER to rank B (DyLoRA prefix) or reduce it optimally (SVD), and write OUT.

    DyLoRA at rank b is (alpha / b) * B[:, :b] @ A[:b]: the output keeps alpha and sets r = b.
    SVD reduction uses the QR core, never the full update, and writes r = alpha = new rank.

    Examples:

      loramerge truncate fixtures/dylora/kohya-dylora.safetensors --rank 4 -o dy4.safetensors

      loramerge truncate fixtures/dylora/official --alpha 8 --rank 2,4,8 -o ranks

      loramerge truncate fixtures/adapters/llama-lora --energy 0.9 --max-rank 6 -o small
    """
    from loramerge.jobs.truncate import TruncateOptions, truncate_adapter

    options = TruncateOptions(
        ranks=rank or (),
        method=method,
        energy=energy,
        max_rank=max_rank,
        to=to,
        engine=engine,
        merge=merge,
        dtype=dtype,
    )
    with byte_progress("merging", quiet or json_output or not merge) as progress:
        result = truncate_adapter(
            adapter,
            out,
            options,
            alpha=alpha,
            base=base,
            fmt=fmt,
            force=force,
            allow_nonfinite=allow_nonfinite,
            progress=progress,
        )
    if not json_done(result, json_output) and not quiet:
        _render(result)
        print_engine_report(result.engine, quiet)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _render(result) -> None:
    from rich.table import Table

    for output in result.outputs:
        what = f"rank {output.rank}" if output.rank is not None else "energy-chosen ranks"
        how = "DyLoRA prefix truncation" if result.method == "prefix" else "SVD reduction"
        table = Table(title=f"{how} to {what}: {output.out}", title_justify="left")
        for column in ("module", "r", "new r", "energy kept", "rel. error", "|dW|", "new |dW|"):
            table.add_column(column, no_wrap=True)
        for row in output.modules:
            table.add_row(
                row.module,
                str(row.rank_before),
                str(row.rank_after),
                _number(row.energy_kept, ".4%"),
                _number(row.relative_error, ".3e"),
                _number(row.norm_before, ".4g"),
                _number(row.norm_after, ".4g"),
            )
        stdout.print(table)
        kind = "merged model folder" if result.output == "merged" else f"{result.output} adapter"
        stdout.print(f"wrote {output.out} ({kind}; {output.parameters:,} LoRA parameters)")
