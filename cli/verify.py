"""`loramerge verify`: do two adapters, or an adapter and a merged model, mean the same?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from loramerge_cli.common import (
    BaseOption,
    Debug,
    JsonOutput,
    Quiet,
    note,
    print_json,
    stdout,
    user_errors,
)


def verify(
    source: Annotated[Path, typer.Argument(help="The reference: an adapter in any format.")],
    candidate: Annotated[
        Path,
        typer.Argument(help="What should mean the same: an adapter (GGUF too) or merged model."),
    ],
    base: BaseOption = None,
    text: Annotated[
        Path | None,
        typer.Option(
            "--text", help="Text file to run through the base (needs --base): compares logits."
        ),
    ] = None,
    atol: Annotated[
        float, typer.Option("--atol", help="Absolute tolerance on each difference.")
    ] = 1e-6,
    rtol: Annotated[
        float,
        typer.Option(
            "--rtol",
            help="Relative tolerance: of each module's update norm, or of the largest logit.",
        ),
    ] = 1e-4,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Check that CANDIDATE means the same as SOURCE; exit 1 naming the worst module if not.

    Without --text, every module's update is compared from the factors: the Frobenius norm of
    the difference (QR core, never the full matrix) must be <= atol + rtol x the source
    update's norm. With --base and --text both run through transformers on the base and the
    logits must agree within atol + rtol x the largest logit.

    Example: loramerge verify fixtures/adapters/llama-lora llama-vllm

    Example: loramerge verify ADAPTER merged --base BASE --text eval.txt
    """
    with user_errors(debug):
        from loramerge.jobs.verify import verify as run_verify

        result = run_verify(source, candidate, base=base, text=text, atol=atol, rtol=rtol)
        if json_output:
            print_json(result.to_json())
        for message in result.notes:
            note(message, quiet or json_output)
        worst = result.worst
        if not result.passed:
            allowed = atol + rtol * worst.source_norm
            typer.echo(
                f"error: {candidate} differs from {source}: {worst.name}: difference "
                f"{worst.diff_norm:.3e} (relative {worst.relative:.3e}) > tolerance "
                f"{allowed:.3e} (atol {atol:g} + rtol {rtol:g} x {worst.source_norm:.3e})",
                err=True,
            )
            raise typer.Exit(1)
        if json_output:
            return
        if result.mode == "logits":
            logits = result.logits or {}
            stdout.print(
                f"ok: {candidate} matches {source} on {logits['tokens']} tokens: max |logits "
                f"difference| {logits['max_abs_diff']:.3e}, loss {logits['loss_source']:.6f} "
                f"vs {logits['loss_candidate']:.6f}"
            )
            return
        largest = f"{worst.relative:.3e} ({worst.name})" if worst else "none"
        stdout.print(
            f"ok: {candidate} matches {source}: {len(result.differences)} compared, "
            f"largest relative difference {largest}"
        )
