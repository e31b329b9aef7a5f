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
    print_engine_report,
    print_json,
    stdout,
    user_errors,
)


def convert(
    adapter: Annotated[Path, typer.Argument(help="Adapter to convert.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (peft) or file (kohya, gguf).")
    ],
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="Output format: peft, kohya, diffusers or gguf (llama.cpp; needs --base). "
            "Default: the engine's format with --engine, else required.",
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
    """Rewrite ADAPTER as a PEFT folder, a kohya file or a diffusers LoRA, module for module.

    With --base, module names are matched against the base model's tensors exactly (kohya
    names lose their dots; without a base they are reconstructed from common layer names).

    With --engine, the adapter is first rewritten for that engine where this is exact (scales
    folded into lora_B, ranks zero-padded, zero modules added) and refused where it is not.

    Example: loramerge convert fixtures/kohya/llama-lora.safetensors --to peft -o llama-peft

    Example: loramerge convert ADAPTER --engine vllm -o for-vllm

    Example: loramerge convert ADAPTER --to gguf --base BASE -o adapter.gguf

    Example: loramerge convert sdxl-lora.safetensors --to peft --component unet -o unet-peft
    """
    with user_errors(debug):
        from loramerge.errors import OptionError
        from loramerge.jobs.convert import convert_adapter

        if to is None and engine is None:
            raise OptionError("pass --to (peft, kohya, diffusers or gguf) or --engine")
        if to is None:
            from loramerge.engines.profiles import engine_profile

            to = engine_profile(engine).formats[0]
        result = convert_adapter(
            adapter,
            to,
            out,
            base=base,
            fmt=fmt,
            force=force,
            allow_nonfinite=allow_nonfinite,
            engine=engine,
            component=component,
        )
        if json_output:
            print_json(result)
            return
        stdout.print(f"wrote {result['out']} ({result['format']}, {result['modules']} modules)")
        print_engine_report(result, quiet)
