"""The one place where errors meet the terminal: every command runs inside `reporting`, which
turns loramerge's errors into one line with the flag names, and usage errors into Click's.

Exit status: 0 success; 1 a problem with the inputs, the outputs or the result (one line
`error: ...` on stderr); 2 a usage error (Click's `Usage: ... Error: ...`): what the command line
says is wrong whatever the files hold; 130 interrupted. Any other exception is a bug in
loramerge and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from loramerge.errors import LoramergeError, UsageError, show_options


def flag(option: str) -> str:
    """The command-line flag of an option id: `max_shard_size` -> `--max-shard-size`."""
    return "--" + option.replace("_", "-")


def cli_text(text: str) -> str:
    """Library text (an error, warning or note) with its options shown as flags."""
    return show_options(text, flag)


def error_line(exc: LoramergeError) -> str:
    """The one `error:` line for a loramerge error, on one line whatever it holds."""
    return "error: " + " ".join(exc.render(flag).split())


def _usage_error(exc: UsageError) -> typer.BadParameter:
    """A loramerge usage error as Click reports its own: `Invalid value for '--rank 0': ...`."""
    text = " ".join(exc.render(flag, with_option=False).split())
    if exc.option:
        return typer.BadParameter(text, param_hint=f"'{exc.option_text(flag)}'")
    return typer.BadParameter(text)


def _leave_quietly() -> None:
    """stdout's reader went away (`loramerge inspect X | head -1`): what is left to print has
    nowhere to go, which is no error, as for tools that SIGPIPE ends."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def reporting(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run `command`, reporting errors as this module's docstring says; `--debug` (the
    command's `debug` argument) lets loramerge's errors through with their tracebacks."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:
            _leave_quietly()
            raise typer.Exit(0) from None
        except UsageError as exc:
            if debug:
                raise
            raise _usage_error(exc) from None
        except LoramergeError as exc:
            if debug:
                raise
            typer.echo(error_line(exc), err=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            # the system refusing a path the user gave (name too long, permission, I/O error) is
            # an answer about the user's files, not a bug in loramerge
            if debug:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; nothing was written", err=True)
            raise typer.Exit(130) from None

    return run
