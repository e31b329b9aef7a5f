"""`loramerge fold`: a COLA chain of LoRAs folded into the base weights, or into one adapter."""

from __future__ import annotations

import time
from pathlib import Path
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
    note,
    parse_size,
    print_engine_report,
    print_json,
    stdout,
    user_errors,
    warn,
)


def fold(
    links: Annotated[
        list[Path],
        typer.Argument(
            help="The chain's links in training order (each a LoRA in any format loramerge "
            "reads), or one folder holding the links and a cola_chain.json manifest."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Model folder to write (an adapter folder with --as-lora)."
        ),
    ],
    base: BaseOption = None,
    rounding: Annotated[
        str,
        typer.Option(
            "--rounding",
            help="once: sum every link in float32 and round once (default). per-link: round "
            "after each link, as tying each knot in the base dtype did during training.",
        ),
    ] = "once",
    as_lora: Annotated[
        bool,
        typer.Option(
            "--as-lora",
            help="Write one PEFT adapter equal to the whole chain (r = lora_alpha = sum of ranks).",
        ),
    ] = False,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            help="With --as-lora: compress each module to at most this rank (optimal SVD) and "
            "report the energy kept.",
        ),
    ] = None,
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
    with user_errors(debug):
        from loramerge.errors import OptionError
        from loramerge.jobs.fold import ROUNDINGS, fold_to_adapter, fold_to_model, load_chain
        from loramerge.jobs.merge import dtype_code_of

        if rounding not in ROUNDINGS:
            raise OptionError(f"--rounding {rounding!r}: choose one of {', '.join(ROUNDINGS)}")
        if engine is not None and not as_lora:
            raise OptionError("--engine rewrites an adapter: it needs --as-lora")
        if as_lora and rounding != "once":
            raise OptionError("--rounding applies to a merged model, not to --as-lora")
        if as_lora and max_shard_size is not None:
            raise OptionError("--max-shard-size applies to a merged model, not to --as-lora")
        if rank is not None and not as_lora:
            raise OptionError("--rank needs --as-lora (it compresses the folded adapter)")
        if rank is not None and rank < 1:
            raise OptionError(f"--rank must be at least 1, got {rank}")
        if base is None and not as_lora:
            raise OptionError("--base is required to fold a chain into a model")
        shard_bytes = parse_size(max_shard_size)
        dtype_code_of(dtype)
        chain, warnings = load_chain(links, base, allow_nonfinite=allow_nonfinite)
        started = time.perf_counter()
        if as_lora:
            report: dict = {}
            result = fold_to_adapter(
                chain, out, rank=rank, dtype=dtype, force=force, engine=engine, base=base,
                report=report,
            )  # fmt: skip
        else:
            assert base is not None
            with byte_progress("folding", quiet or json_output) as progress:
                result = fold_to_model(
                    chain,
                    base,
                    out,
                    rounding=rounding,
                    dtype=dtype,
                    force=force,
                    max_shard_bytes=shard_bytes,
                    progress=progress,
                )
        seconds = time.perf_counter() - started
        warnings += result.warnings
        summary = _summary(result, seconds, warnings)
        if as_lora and report:
            summary["engine"] = report
        if json_output:
            print_json(summary)
            return
        for message in warnings:
            warn(message, quiet)
        _render(summary)
        if as_lora:
            print_engine_report(report, quiet)
        if result.merge is not None and result.merge.plan.untied:
            note("tied embeddings were untied: the chain changed one side of them", quiet)


def _summary(result, seconds: float, warnings: list[str]) -> dict[str, Any]:
    links = []
    for link in result.links:
        links.append(
            {
                "index": link.index,
                "path": str(link.path),
                "weight": link.weight,
                "base_model": link.base_model,
                "update_norm": link.norm,
                "changed_share": link.changed_share,
                "modules": {
                    path: {
                        "rank": m.rank,
                        "scale": m.scale,
                        "update_norm": m.norm,
                        "changed_share": m.changed_share,
                    }
                    for path, m in link.modules.items()
                },
            }
        )
    summary: dict[str, Any] = {
        "out": str(result.out),
        "kind": "adapter" if result.folded is not None else "model",
        "rounding": result.rounding,
        "seconds": round(seconds, 3),
        "links": links,
        "chain_update_norm": {path: norm for path, norm in result.chain_norms.items()},
        "warnings": warnings,
    }
    if result.merge is not None:
        merge = result.merge
        summary["bytes"] = result.bytes_written
        summary["shards"] = [s.file_name for s in merge.plan.shards]
        summary["tensors"] = result.counts
        if result.rounding == "once":
            summary["changed_share"] = {
                name: stats.changed_share for name, stats in merge.modules.items()
            }
    if result.folded is not None:
        folded = result.folded
        summary["energy_kept"] = folded.energy_kept
        summary["modules"] = {
            path: {
                "rank": m.rank,
                "link_ranks": list(m.link_ranks),
                "energy_kept": m.energy_kept,
                "relative_error": m.relative_error,
            }
            for path, m in folded.modules.items()
        }
    return summary


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
