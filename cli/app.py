"""The `loramerge` Typer application: one command per module, each registered here inside the
one error handler (loramerge_cli.errors.reporting)."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import Annotated

import typer
from loramerge_cli import process  # noqa: F401 - process-wide settings, before torch loads
from loramerge_cli.convert import convert
from loramerge_cli.errors import reporting
from loramerge_cli.fold import fold
from loramerge_cli.inspect import inspect
from loramerge_cli.merge import merge
from loramerge_cli.reslora import reslora, reslora_stats
from loramerge_cli.truncate import truncate
from loramerge_cli.verify import verify
from typer.core import TyperCommand


class _Command(TyperCommand):
    """Usage lines as POSIX tools write them: `loramerge merge [OPTIONS] ADAPTER`, required
    arguments bare and optional ones in brackets (Typer writes required ones in braces)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = param.metavar or param.name.upper()
            if param.nargs != 1 and not name.endswith("..."):
                name += "..."
            pieces.append(name if param.required else f"[{name}]")
        return pieces


app = typer.Typer(
    name="loramerge",
    help="Turn LoRA-variant checkpoints into standard adapters or fully merged models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # Click's plain help: flags shown as flags, no panels to wrap
)
COMMANDS = {
    "merge": merge,
    "inspect": inspect,
    "convert": convert,
    "reslora": reslora,
    "reslora-stats": reslora_stats,
    "fold": fold,
    "truncate": truncate,
    "verify": verify,
}
for _name, _command in COMMANDS.items():
    app.command(name=_name, cls=_Command)(reporting(_command))


def _print_version(value: bool) -> None:
    if value:
        from loramerge import __version__

        typer.echo(f"loramerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Turn LoRA-variant checkpoints into standard adapters or fully merged models."""


def main() -> None:
    """The console script: run the command, then leave without tearing the interpreter down.

    When a command returns, its outputs are written, synced and renamed into place. What a
    normal exit still does is unload every module, torch's above all: 0.4-0.5 s on the
    benchmark machine, a tenth of a 1B-parameter merge, for nothing the user sees. So the
    console script flushes what it printed, runs the atexit hooks, and ends the process there.
    A command that raises (a traceback under --debug) takes the ordinary way out.
    """
    try:
        app()
        code = 0
    except SystemExit as exit_request:
        code = _exit_status(exit_request.code)
    atexit._run_exitfuncs()  # first: a hook may still print (logging flushes its handlers)
    for stream in (sys.stdout, sys.stderr):
        # a reader that went away (`| head`) needs no message, as with tools killed by SIGPIPE
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.flush()
    os._exit(code)


def _exit_status(code: object) -> int:
    """The status `sys.exit(code)` would give, printing a message as Python does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
