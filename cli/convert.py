"""`loramerge convert`: an adapter rewritten in another adapter format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from loramerge_cli.common import (
    AllowNonfinite,
    BaseOption,
    Debug,
    Force,
    InputFormatOption,
    JsonOutput,
    Quiet,
    print_json,
    stdout,
    user_errors,
)


def convert(
    adapter: Annotated[Path, typer.Argument(help="Adapter to convert.")],
    to: Annotated[str, typer.Option("--to", help="Output format: peft or kohya.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (peft) or file (kohya).")],
    base: BaseOption = None,
    fmt: InputFormatOption = None,
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Rewrite ADAPTER as a PEFT folder or a kohya file, module for module.

    With --base, module names are matched against the base model's tensors exactly (kohya
    names lose their dots; without a base they are reconstructed from common layer names).

    Example: loramerge convert fixtures/kohya/llama-lora.safetensors --to peft -o llama-peft
    """
    with user_errors(debug):
        from loramerge.convert import convert_adapter

        result = convert_adapter(
            adapter, to, out, base=base, fmt=fmt, force=force, allow_nonfinite=allow_nonfinite
        )
        if json_output:
            print_json(result)
            return
        stdout.print(f"wrote {result['out']} ({result['format']}, {result['modules']} modules)")
