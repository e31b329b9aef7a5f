"""The `loramerge` Typer application: one command per module, registered here."""

from __future__ import annotations

import typer
from loramerge_cli import process  # noqa: F401 - process-wide settings, before torch loads
from loramerge_cli.convert import convert
from loramerge_cli.fold import fold
from loramerge_cli.inspect import inspect
from loramerge_cli.merge import merge
from loramerge_cli.reslora import reslora, reslora_stats
from loramerge_cli.truncate import truncate
from loramerge_cli.verify import verify

app = typer.Typer(
    name="loramerge",
    help="Turn LoRA-variant checkpoints into standard adapters or fully merged models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(merge)
app.command()(inspect)
app.command()(convert)
app.command(name="reslora")(reslora)
app.command(name="reslora-stats")(reslora_stats)
app.command()(fold)
app.command()(truncate)
app.command()(verify)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        from loramerge import __version__

        typer.echo(f"loramerge {__version__}")
        raise typer.Exit()


def main() -> None:
    app()
