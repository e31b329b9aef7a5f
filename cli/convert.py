"""`loramerge convert`: an adapter rewritten in another adapter format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from loramerge_cli.common import (
    AllowNonfinite,
    BaseOption,
    Component,
    Debug,
    Engine,
    Force,
    InputFormatOption,
    JsonOutput,
    Quiet,
    choices,
    print_engine_report,
    print_json,
    show,
)

from loramerge.formats.registry import OUTPUT_FORMAT_NAMES


def convert(
    adapter: Annotated[
        str,
        typer.Argument(
            metavar="ADAPTER", help="Adapter to convert (a path or a cached hub repo id)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            metavar="OUT",
            help="Output folder (peft, diffusers) or file (kohya: .safetensors, gguf: .gguf).",
        ),
    ],
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar=choices(OUTPUT_FORMAT_NAMES),
            help="Output format (gguf is llama.cpp's and needs --base). Default: the engine's "
            "format with --engine, else required.",
        ),
    ] = None,
    engine: Engine = None,
    base: BaseOption = None,
    fmt: InputFormatOption = None,
    component: Component = None,
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Rewrite ADAPTER as a PEFT folder, a kohya file, a diffusers LoRA or a llama.cpp GGUF,
    module for module.

    With --base, module names are matched against the base model's tensors exactly (kohya
    names lose their dots; without a base they are reconstructed from common layer names).

    With --engine, the adapter is first rewritten for that engine where this is exact (scales
    folded into lora_B, ranks zero-padded, zero modules added) and refused where it is not.

    Example: loramerge convert fixtures/kohya/llama-lora.safetensors --to peft -o llama-peft

    Example: loramerge convert ADAPTER --engine vllm -o for-vllm

    Example: loramerge convert ADAPTER --to gguf --base BASE -o adapter.gguf

    Example: loramerge convert sdxl-lora.safetensors --to peft --component unet -o unet-peft
    """
    from loramerge.jobs.convert import convert_adapter

    result = convert_adapter(
        adapter,
        out,
        to=to,
        engine=engine,
        base=base,
        fmt=fmt,
        force=force,
        allow_nonfinite=allow_nonfinite,
        component=component,
    )
    if json_output:
        print_json(result)
        return
    show(f"wrote {result['out']} ({result['format']}, {result['modules']} modules)", quiet)
    print_engine_report(result, quiet)
