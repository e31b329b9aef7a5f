"""`loramerge convert`: an adapter rewritten in another adapter format."""

from __future__ import annotations

from typing import Annotated

import typer
from loramerge_cli.common import (
    AllowNonfinite,
    BaseOption,
    Component,
    Debug,
    DyloraAlpha,
    Engine,
    Force,
    InputFormatOption,
    JsonOutput,
    Quiet,
    choices,
    note,
    out_option,
    print_engine_report,
    print_json,
    show,
)

from loramerge.formats.registry import OUTPUT_FORMAT_NAMES

# the options of `convert`, each with its help
AdapterArgument = Annotated[
    str,
    typer.Argument(metavar="ADAPTER", help="Adapter to convert (a path or a cached hub repo id)."),
]
OutOption = out_option(
    "Output folder (peft, diffusers) or file (kohya: .safetensors, gguf: .gguf)."
)
ToOption = Annotated[
    str | None,
    typer.Option(
        "--to",
        metavar=choices(OUTPUT_FORMAT_NAMES),
        help="Output format (gguf is llama.cpp's and needs --base). Default: the engine's "
        "format with --engine, else required.",
    ),
]
MaxRankOption = Annotated[
    int | None,
    typer.Option(
        "--max-rank",
        metavar="K",
        help="Reduce modules above rank K, and forms with no low-rank form, to at most K "
        "(QR-core SVD); with --energy, a cap.",
    ),
]
EnergyOption = Annotated[
    float | None,
    typer.Option(
        "--energy",
        metavar="SHARE",
        help="Give each module the smallest rank keeping this share of its update's "
        "energy, e.g. 0.99.",
    ),
]


def convert(
    adapter: AdapterArgument,
    out: OutOption,
    to: ToOption = None,
    max_rank: MaxRankOption = None,
    energy: EnergyOption = None,
    alpha: DyloraAlpha = None,
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
    """Rewrite ADAPTER as a PEFT folder, a kohya file, a diffusers LoRA, a llama.cpp GGUF or an
    mlx-lm folder, module for module.

    Adapters of other tuners (PEFT AdaLoRA, LoHa, LoKr, VeRA, MiSS, DeLoRA, LyCORIS), mlx-lm
    folders and torchtune checkpoints are written in their exact LoRA form. Forms whose exact
    rank is larger than the matrix they update are refused unless --max-rank or --energy
    reduce them; the energy each reduction keeps is reported.

    With --base, module names are matched against the base model's tensors exactly (kohya
    names lose their dots; without a base they are reconstructed from common layer names).

    With --engine, the adapter is first rewritten for that engine where this is exact (scales
    folded into lora_B, ranks zero-padded, zero modules added) and refused where it is not.

    Example: loramerge convert fixtures/kohya/llama-lora.safetensors --to peft -o llama-peft

    Example: loramerge convert ADAPTER --engine vllm -o for-vllm

    Example: loramerge convert ADAPTER --to gguf --base BASE -o adapter.gguf

    Example: loramerge convert sdxl-lora.safetensors --to peft --component unet -o unet-peft

    Example: loramerge convert fixtures/peft-tuners/lokr-full-w1 --to peft -o lokr --max-rank 8
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
        alpha=alpha,
        max_rank=max_rank,
        energy=energy,
    )
    if json_output:
        print_json(result)
        return
    show(f"wrote {result['out']} ({result['format']}, {result['modules']} modules)", quiet)
    _print_ranks(result, quiet)
    print_engine_report(result, quiet)


def _print_ranks(result: dict, quiet: bool) -> None:
    """Notes of the reader, the ranks it produced, and what a reduction kept."""
    notes = (result.get("read_as") or {}).get("notes")
    if notes:
        note(f"{result['source_format']}: {notes}", quiet)
    ranks = result.get("ranks_read") or []
    rows = result.get("reduction")
    if rows is None:
        if ranks and result.get("source_format") not in ("peft", "kohya"):
            show(f"ranks: {_span(ranks)} (exact)", quiet)
        return
    reduced = [r for r in rows if r["rank_after"] < r["rank_before"] or r["relative_error"] > 0]
    if not reduced:
        show(f"ranks: {_span(ranks)}, none reduced", quiet)
        return
    after = sorted({r["rank_after"] for r in rows})
    worst = min(reduced, key=lambda r: r["energy_kept"])
    show(
        f"ranks: {_span(ranks)} read, {_span(after)} written; {len(reduced)} modules reduced, "
        f"energy kept >= {worst['energy_kept']:.6f} (relative error <= "
        f"{max(r['relative_error'] for r in reduced):.3g}, {worst['module']})",
        quiet,
    )


def _span(values: list[int]) -> str:
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}-{values[-1]}"
