"""`loramerge inspect`: what an adapter holds and, with a base, what merging it would change."""

from __future__ import annotations

from typing import Annotated

import typer
from loramerge_cli.common import (
    BaseOption,
    Component,
    Debug,
    DyloraAlpha,
    InputFormatOption,
    JsonOutput,
    Quiet,
    byte_progress,
    json_done,
    stdout,
)


def inspect(
    path: Annotated[
        str,
        typer.Argument(
            metavar="ADAPTER",
            help="Adapter to describe, in any format loramerge reads (a path or a cached hub "
            "repo id).",
        ),
    ],
    base: BaseOption = None,
    fmt: InputFormatOption = None,
    alpha: DyloraAlpha = None,
    component: Component = None,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Describe an adapter: format, ranks, scales and the size of every module's update.

    Update norms come from the factors (QR core), never from the full matrix. With --base,
    each update is compared with its weight and with what rounding to the base dtype keeps.

    Example: loramerge inspect fixtures/adapters/llama-lora --base fixtures/bases/llama
    """
    from loramerge.jobs.inspect import inspect as run_inspect

    with byte_progress("reading the base", quiet or json_output) as progress:
        report = run_inspect(
            path, base, fmt=fmt, alpha=alpha, progress=progress, component=component
        )
    if json_done(report, json_output):
        return
    if not quiet:
        _render(report, base is not None)


def _render(report, with_base: bool) -> None:
    from rich.table import Table

    summary = Table(show_header=False, box=None)
    for key, value in (
        ("path", report.path),
        ("format", report.format),
        ("base model", report.base_model or "unknown"),
        ("modules", report.module_count),
        ("ranks", ", ".join(map(str, report.ranks)) or "- (dense updates only)"),
        ("alphas", ", ".join(f"{a:g}" for a in report.alphas)),
        ("scales", ", ".join(f"{s:g}" for s in report.scales)),
        ("dtypes", ", ".join(report.dtypes)),
        ("parameters", f"{report.parameter_count:,}"),
        ("modules_to_save", ", ".join(report.modules_to_save) or "none"),
        *((f"read: {key}", value) for key, value in report.read_as.items()),
    ):
        summary.add_row(f"[bold]{key}[/]", str(value))
    stdout.print(summary)
    columns = ["kind", "r", "alpha", "scale", "|dW|"]
    if with_base:
        columns += ["|dW|/|W|", "changed"]
    table = Table()
    table.add_column("module", no_wrap=True)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for m in report.modules:
        dense = m.rule is not None  # a dense update: no rank, alpha or scale
        row = [
            m.path,
            m.kind + (" +DoRA" if m.dora else "") + (f" ({m.rule})" if dense else ""),
            "-" if dense else str(m.r),
            "-" if dense else f"{m.alpha:g}",
            "-" if dense else f"{m.scale:.4g}",
            "-" if m.update_norm is None else f"{m.update_norm:.4g}",
        ]
        if with_base:
            ratio = f"{m.relative_update:.3e}" if m.relative_update is not None else "-"
            kept = f"{m.changed_share:.1%}" if m.changed_share is not None else "-"
            row += [ratio, kept]
        table.add_row(*row)
    stdout.print(table)
    if report.dylora_ranks:
        _render_dylora(report.dylora_ranks)


def _render_dylora(sizes) -> None:
    """DyLoRA: the whole update's size at each trained rank b, to see where more rank stops
    changing the model."""
    from rich.table import Table

    table = Table(title="DyLoRA update size by rank b (all modules)", title_justify="left")
    for column in ("b", "|dW_b|", "|dW_b - dW_rmax| / |dW_rmax|"):
        table.add_column(column, no_wrap=True)
    for size in sizes:
        table.add_row(str(size.rank), f"{size.update_norm:.4g}", f"{size.change_from_full:.3f}")
    stdout.print(table)
