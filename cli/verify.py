"""`loramerge verify`: do two adapters, or an adapter and a merged model, mean the same?"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from loramerge_cli.common import (
    BaseOption,
    Debug,
    JsonOutput,
    Quiet,
    byte_progress,
    note,
    print_json,
    show,
)

from loramerge.jobs.defaults import VERIFY_ATOL, VERIFY_RTOL

if TYPE_CHECKING:
    from loramerge.jobs.verify_result import VerifyResult

# the options of `verify`, each with its help
SourceArgument = Annotated[
    str,
    typer.Argument(
        metavar="SOURCE",
        help="The reference: an adapter in any format (a path or a cached hub repo id).",
    ),
]
CandidateArgument = Annotated[
    str,
    typer.Argument(
        metavar="CANDIDATE",
        help="What should mean the same: an adapter (GGUF too) or a merged model folder.",
    ),
]
TextOption = Annotated[
    Path | None,
    typer.Option(
        "--text",
        metavar="FILE",
        help="Text file to run through the base (needs --base): compares logits.",
    ),
]
AtolOption = Annotated[float, typer.Option("--atol", help="Absolute tolerance on each difference.")]
RtolOption = Annotated[
    float,
    typer.Option(
        "--rtol",
        help="Relative tolerance: of each module's update norm, or of the largest logit.",
    ),
]


def verify(
    source: SourceArgument,
    candidate: CandidateArgument,
    base: BaseOption = None,
    text: TextOption = None,
    atol: AtolOption = VERIFY_ATOL,
    rtol: RtolOption = VERIFY_RTOL,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Check that CANDIDATE means the same as SOURCE; exit 1 naming the worst module if not.

    Two adapters, without --text: every module's update is compared from the factors: the
    Frobenius norm of the difference (QR core, never the full matrix) must be <= atol + rtol x
    the source update's norm. An adapter and a merged model folder, with --base and no --text:
    weight by weight, streamed, against what merging the adapter into the base writes;
    differences up to one unit in the last place of the folder's dtype count as rounding, and
    per module the rest must be <= atol + rtol x the update's norm. With --base and --text both
    run through transformers on the base (an adapter applied by loramerge's own forward, as
    PEFT computes it) and the logits must agree within atol + rtol x the largest logit.

    Example: loramerge verify fixtures/adapters/llama-lora llama-vllm

    Example: loramerge verify ADAPTER merged --base BASE

    Example: loramerge verify ADAPTER merged --base BASE --text eval.txt
    """
    from loramerge.jobs.verify import verify as run_verify

    with byte_progress("comparing", quiet or json_output) as progress:
        result = run_verify(
            source, candidate, base=base, text=text, atol=atol, rtol=rtol, progress=progress
        )
    if json_output:
        print_json(result.to_json())
    for message in result.notes:
        note(message, quiet or json_output)
    failure = result.failure(source, candidate)
    if failure is not None:
        raise failure
    if not json_output:
        show(_ok_line(result, source, candidate), quiet)


def _ok_line(result: VerifyResult, source: str, candidate: str) -> str:
    """The one line that says what matched, and by how much."""
    worst = result.worst
    if result.mode == "logits":
        logits = result.logits or {}
        return (
            f"ok: {candidate} matches {source} on {logits['tokens']} tokens: max |logits "
            f"difference| {logits['max_abs_diff']:.3e}, loss {logits['loss_source']:.6f} "
            f"vs {logits['loss_candidate']:.6f}"
        )
    if result.mode == "weights":
        changed = [d for d in result.differences if d.source_norm > 0]
        return (
            f"ok: {candidate} matches {source}: {len(result.differences)} tensors or modules "
            f"compared ({len(changed)} changed by the merge), largest difference beyond "
            f"rounding {worst.diff_norm if worst else 0.0:.3e}"
        )
    largest = f"{worst.relative:.3e} ({worst.name})" if worst else "none"
    return (
        f"ok: {candidate} matches {source}: {len(result.differences)} compared, "
        f"largest relative difference {largest}"
    )
