"""What every command shares: option aliases (choices from the library's registries), parsers
for sizes and rank lists, and where output goes.

Output discipline: results go to stdout (tables and summary lines, or JSON with --json);
progress bars and notes to stderr; warnings and errors always reach stderr. `-q` leaves only
warnings and errors (and the JSON that --json asks for).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from loramerge_cli.errors import cli_text
from rich.console import Console

from loramerge.engines.profiles import ENGINE_NAMES
from loramerge.formats.registry import INPUT_FORMAT_NAMES
from loramerge.formats.sd_names import COMPONENT_ORDER
from loramerge.io.dtypes import OUTPUT_DTYPES


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # Rich would exit 1 here; a reader that went away is no error (loramerge_cli.errors)
        raise BrokenPipeError


# Tables piped to a file or another program are not cut to 80 columns.
stdout = _Console(highlight=False, width=None if sys.stdout.isatty() else 200)
stderr = _Console(stderr=True, highlight=False, soft_wrap=True)


def choices(names: Sequence[str]) -> str:
    """A metavar listing an option's choices, e.g. [peft|kohya|gguf]."""
    return "[" + "|".join(names) + "]"


Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="Print only warnings and errors: no tables, summaries, notes or progress bars "
        "(--json output is still printed).",
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")]
Force = Annotated[bool, typer.Option("--force", help="Replace OUT if it already exists.")]
JsonOutput = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout, for scripts.")
]
InputFormatOption = Annotated[
    str | None,
    typer.Option(
        "--format",
        metavar=choices(INPUT_FORMAT_NAMES),
        help="Read the adapter as this format instead of detecting it.",
    ),
]
BaseOption = Annotated[
    str | None,
    typer.Option(
        "--base", "-b", metavar="BASE", help="Base model: a local folder or a hub repo id (cached)."
    ),
]
OutDtype = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        metavar=choices(list(OUTPUT_DTYPES)),
        help="Output dtype of floating tensors (default: each base tensor's).",
    ),
]
Component = Annotated[
    str | None,
    typer.Option(
        "--component",
        metavar=choices(COMPONENT_ORDER),
        help="The model of a pipeline adapter (kohya, LyCORIS, diffusers) to use, or the one a "
        "single-model adapter is for.",
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
Engine = Annotated[
    str | None,
    typer.Option(
        "--engine",
        metavar=choices(ENGINE_NAMES),
        help="Rewrite the adapter for an inference engine, exactly or not at all "
        "(see docs/engines/).",
    ),
]

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def parse_size(text: str) -> int:
    """'4GB' -> 4_000_000_000; a bare number is refused so that units are never guessed."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*", text)
    units = {unit.upper(): size for unit, size in _UNITS.items()}
    if not match or match.group(2).upper() not in units:
        raise typer.BadParameter(f"{text!r} needs a unit, one of {', '.join(_UNITS)}")
    size = int(float(match.group(1)) * units[match.group(2).upper()])
    if size <= 0:
        raise typer.BadParameter(f"{text!r} is not a positive size")
    return size


def out_option(help_text: str) -> Any:
    """The type of a command's OUT (`--out`, `-o`), with what the command writes there."""
    return Annotated[Path, typer.Option("--out", "-o", metavar="OUT", help=help_text)]


class Ranks(tuple):
    """Ranks given as one option value, e.g. 4,8,16 (one class, so that Typer takes one value
    and does not read a tuple type as several)."""


def parse_ranks(text: str) -> Ranks:
    """'8' -> (8,); '4,8,16' -> (4, 8, 16) (sorted, duplicates dropped)."""
    try:
        return Ranks(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a rank; give whole numbers like 8 or 4,8,16"
        ) from None


MaxShardSize = Annotated[
    int | None,
    typer.Option(
        "--max-shard-size",
        metavar="SIZE",
        parser=parse_size,
        help="Re-shard the output into files of at most this size, e.g. 2GB or 500MB "
        "(default: keep the base's shards).",
    ),
]


def warn(message: str) -> None:
    """A warning: always on stderr, -q or not."""
    stderr.print(f"[yellow]warning:[/] {_one_line(message)}")


def note(message: str, quiet: bool) -> None:
    """A note on stderr (what was done and why), silenced by -q."""
    if not quiet:
        stderr.print(_one_line(message))


def show(renderable: Any, quiet: bool) -> None:
    """A result on stdout (a table or a summary line), silenced by -q."""
    if not quiet:
        stdout.print(renderable)


def _one_line(text: str) -> str:
    from rich.markup import escape

    return escape(" ".join(cli_text(text).split()))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def warn_all(messages: Sequence[str]) -> None:
    for message in messages:
        warn(message)


def json_done(result: Any, json_output: bool) -> bool:
    """A job's result reported the common way: its warnings on stderr, then with --json the
    result itself on stdout. True when that was all (the command renders nothing more)."""
    warn_all(result.warnings)
    if json_output:
        print_json(result.to_json())
    return json_output


def print_engine_report(report: dict[str, Any], quiet: bool) -> None:
    """What an --engine profile changed (notes, stderr) and how to start the engine (stdout)."""
    for message in report.get("notes", []):
        note(message, quiet)
    if report.get("launch_args"):
        show(f"start {report['engine']} with {' '.join(report['launch_args'])}", quiet)


@contextmanager
def byte_progress(label: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A Rich progress bar over bytes on stderr; None when quiet or stderr is not a terminal."""
    if quiet or not stderr.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

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
