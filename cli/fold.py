"""`loramerge fold`: a COLA chain of LoRAs folded into the base weights, or into one adapter."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from loramerge_cli.common import (
    AllowNonfinite,
    BaseOption,
    Debug,
    Engine,
    Force,
    JsonOutput,
    MaxShardSize,
    OutDtype,
    Quiet,
    byte_progress,
    choices,
    json_done,
    note,
    out_option,
    print_engine_report,
    stdout,
)

from loramerge.jobs.defaults import ROUNDINGS

# the options of `fold`, each with its help
LinksArgument = Annotated[
    list[str],
    typer.Argument(
        metavar="LINK...",
        help="The chain's links in training order (each a LoRA in any format loramerge "
        "reads), or one folder holding the links and a cola_chain.json manifest.",
    ),
]
OutOption = out_option("Model folder to write (an adapter folder with --as-lora).")
RoundingOption = Annotated[
    str,
    typer.Option(
        "--rounding",
        metavar=choices(ROUNDINGS),
        help="once: sum every link in float32 and round once (default). per-link: round "
        "after each link, as tying each knot in the base dtype did during training.",
    ),
]
AsLoraOption = Annotated[
    bool,
    typer.Option(
        "--as-lora",
        help="Write one PEFT adapter equal to the whole chain (r = lora_alpha = sum of ranks).",
    ),
]
RankOption = Annotated[
    int | None,
    typer.Option(
        "--rank",
        help="With --as-lora: compress each module to at most this rank (optimal SVD) and "
        "report the energy kept.",
    ),
]


def fold(
    links: LinksArgument,
    out: OutOption,
    base: BaseOption = None,
    rounding: RoundingOption = ROUNDINGS[0],
    as_lora: AsLoraOption = False,
    rank: RankOption = None,
    engine: Engine = None,
    dtype: OutDtype = None,
    max_shard_size: MaxShardSize = None,
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fold a COLA chain (LoRAs trained one on top of the other) into BASE.

    The merged model is W_0 + the sum of every link's update, computed in
    float32 and rounded once to the output dtype. --rounding per-link rounds
    after each link instead, as tying each knot in the base dtype did during
    training. --as-lora writes one adapter equal to the chain; --dtype is then
    the adapter's dtype (default float32) and --base is optional (given, every
    link is checked against it).

    Examples:

      loramerge fold fixtures/cola --base fixtures/bases/llama -o folded

      loramerge fold link-1 link-2 link-3 --base BASE -o out --rounding per-link

      loramerge fold fixtures/cola --as-lora --rank 8 -o one-lora
    """
    from loramerge.jobs.fold import FoldOptions
    from loramerge.jobs.fold import fold as run_fold

    options = FoldOptions(rounding, as_lora, rank, engine, dtype, max_shard_size)
    with byte_progress("folding", quiet or json_output or as_lora) as progress:
        result = run_fold(
            links,
            out,
            options,
            base=base,
            allow_nonfinite=allow_nonfinite,
            force=force,
            progress=progress,
        )
    if json_done(result, json_output):
        return
    if not quiet:
        _render(result.to_json())
    print_engine_report(result.engine, quiet)
    if result.merge is not None and result.merge.plan.untied:
        note("tied embeddings were untied: the chain changed one side of them", quiet)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _render(summary: dict[str, Any]) -> None:
    from rich.table import Table

    per_link = summary["rounding"] == "per-link"
    table = Table("link", "path", "weight", "modules", "ranks", "‖ΔW‖_F", title="COLA chain")
    if per_link:
        table.add_column("changed by its knot")
    for link in summary["links"]:
        ranks = sorted({m["rank"] for m in link["modules"].values()})
        row = [
            str(link["index"]),
            link["path"],
            f"{link['weight']:g}",
            str(len(link["modules"])),
            ", ".join(map(str, ranks)),
            f"{link['update_norm']:.4g}",
        ]
        if per_link:
            row.append(_share(link["changed_share"]))
        table.add_row(*row)
    stdout.print(table)
    chain_norm = sum(n * n for n in summary["chain_update_norm"].values()) ** 0.5
    if summary["kind"] == "adapter":
        ranks = sorted({m["rank"] for m in summary["modules"].values()})
        stdout.print(
            f"wrote {summary['out']} (PEFT adapter, {len(summary['modules'])} modules, rank "
            f"{', '.join(map(str, ranks))}, energy kept {summary['energy_kept']:.4%}; "
            f"chain ‖ΔW‖_F {chain_norm:.4g}) in {summary['seconds']:.2f} s"
        )
        return
    counts = summary["tensors"]
    text = (
        f"wrote {summary['out']} ({len(summary['shards'])} shard(s), "
        f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.2f} s, rounded "
        f"{'after every link' if per_link else 'once'}): {counts['merge']} merged, "
        f"{counts['copy']} copied, {counts['cast']} cast; chain ‖ΔW‖_F {chain_norm:.4g}"
    )
    if not per_link and summary.get("changed_share"):
        shares = list(summary["changed_share"].values())
        text += f"; elements changed after rounding: {min(shares):.1%}-{max(shares):.1%} per module"
    stdout.print(text)
