"""What every command shares: option aliases, the error handler, consoles and progress bars."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from loramerge.errors import LoramergeError, OptionError

# Tables piped to a file or another program are not cut to 80 columns.
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print no progress bars or notes.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")]
Force = Annotated[bool, typer.Option("--force", help="Replace OUT if it already exists.")]
JsonOutput = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout, for scripts.")
]
InputFormatOption = Annotated[
    str | None,
    typer.Option("--format", help="Read the adapter as this format instead of detecting it."),
]
BaseOption = Annotated[
    str | None,
    typer.Option("--base", "-b", help="Base model: a local folder or a hub repo id (cached)."),
]
OutDtype = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Output dtype of floating tensors: float32, float16 or bfloat16 "
        "(default: each base tensor's).",
    ),
]
MaxShardSize = Annotated[
    str | None,
    typer.Option(
        "--max-shard-size",
        help="Re-shard the output into files of at most this size, e.g. 2GB or 500MB "
        "(default: keep the base's shards).",
    ),
]
AllowNonfinite = Annotated[
    bool,
    typer.Option("--allow-nonfinite", help="Accept NaN or Inf values in the adapter."),
]
DyloraAlpha = Annotated[
    float | None,
    typer.Option(
        "--alpha",
        help="Training lora_alpha of an input that stores none: an official DyLoRA checkpoint "
        "or torchtune's adapter_model.pt.",
    ),
]
# The names are those of loramerge.engines.profiles.ENGINES (not imported here: it loads torch);
# tests/engines/test_engines.py checks that this help lists every one of them.
Engine = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="Rewrite the adapter for an inference engine, exactly or not at all: peft, vllm, "
        "tgi, lorax, sglang or llama.cpp (see docs/engines/).",
    ),
]

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | None, option: str = "--max-shard-size") -> int | None:
    """'4GB' -> 4_000_000_000; a bare number is refused so that units are never guessed."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        units = ", ".join(["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
        raise OptionError(f"{option} {text!r} needs a unit, one of {units}")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise OptionError(f"{option} must be positive, got {text!r}")
    return size


@contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """Turn loramerge's own errors into one `error: ...` line and exit status 1."""
    try:
        yield
    except LoramergeError as exc:
        if debug:
            raise
        # plain text, never wrapped: scripts and people both read this one line
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
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


def _one_line(text: str) -> str:
    from rich.markup import escape

    return escape(" ".join(text.split()))


def warn(message: str, quiet: bool = False) -> None:
    if not quiet:
        stderr.print(f"[yellow]warning:[/] {_one_line(message)}")


def note(message: str, quiet: bool = False) -> None:
    if not quiet:
        stderr.print(_one_line(message))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_engine_report(report: dict[str, Any], quiet: bool = False) -> None:
    """What an --engine profile changed (notes, stderr) and how to start the engine (stdout)."""
    for message in report.get("notes", []):
        note(message, quiet)
    if report.get("launch_args"):
        stdout.print(f"start {report['engine']} with {' '.join(report['launch_args'])}")


@contextmanager
def byte_progress(label: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A Rich progress bar over bytes on stderr; None when quiet or stderr is not a terminal."""
    if quiet or not stderr.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def existing_path(text: str) -> Path:
    return Path(text)
