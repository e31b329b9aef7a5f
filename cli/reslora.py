"""`loramerge reslora` and `reslora-stats`: ResLoRA checkpoints to a plain LoRA or merged model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from loramerge_cli.common import (
    Debug,
    Engine,
    Force,
    JsonOutput,
    OutDtype,
    Quiet,
    byte_progress,
    choices,
    json_done,
    note,
    out_option,
    print_engine_report,
    print_json,
    show,
    stdout,
)

from loramerge.jobs.defaults import BATCH_SIZE, SEQ_LEN
from loramerge.ops.reslora_table import MS_RULES, NORMS

Checkpoint = Annotated[
    str,
    typer.Argument(
        metavar="CHECKPOINT",
        help="ResLoRA checkpoint: a folder with reslora_config.json + pytorch_model_lora.bin, a "
        "trainer folder whose config.json has resconfig, or a .safetensors file beside its "
        "config (a path or a cached hub repo id).",
    ),
]
Base = Annotated[
    str,
    typer.Option("--base", "-b", metavar="BASE", help="Base model the checkpoint was trained on."),
]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence cut from the text.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")]
MaxBatches = Annotated[
    int | None, typer.Option("--max-batches", help="Use at most this many batches of the text.")
]


# the options of `reslora`, each with its help
OutOption = out_option("Output: a PEFT folder, or with --merge a model.")
MergeOption = Annotated[
    bool, typer.Option("--merge", help="Write the fully merged model instead of a LoRA.")
]
UniformRankOption = Annotated[
    bool,
    typer.Option("--uniform-rank", help="bs: zero-pad every module to the largest rank (exact)."),
]
RankOption = Annotated[
    int | None,
    typer.Option("--rank", help="Compress every module to this rank (QR-core SVD, lossy)."),
]
NormsOption = Annotated[
    str | None,
    typer.Option(
        "--norms",
        metavar=choices(NORMS),
        help="Norms behind the is/ms coefficients: weights (default; the paper's rule from "
        "the base weights), official (is only: the official code's ||W + (BA)^T||), or "
        "inputs (calibration statistics from --stats; the default when --stats is given).",
    ),
]
StatsOption = Annotated[
    Path | None,
    typer.Option(
        "--stats", metavar="FILE", help="Statistics file written by `loramerge reslora-stats`."
    ),
]
MsRuleOption = Annotated[
    str,
    typer.Option(
        "--ms-rule",
        metavar=choices(MS_RULES),
        help="ms: amerge (merge the previous A's) or scalar (needs --stats).",
    ),
]
CheckTextOption = Annotated[
    Path | None,
    typer.Option(
        "--check-text",
        metavar="FILE",
        help="Run the ResLoRA forward and the written plain model on this text and report "
        "the loss difference and the max logit difference.",
    ),
]


def reslora(
    checkpoint: Checkpoint,
    base: Base,
    out: OutOption,
    merge: MergeOption = False,
    engine: Engine = None,
    uniform_rank: UniformRankOption = False,
    rank: RankOption = None,
    norms: NormsOption = None,
    stats: StatsOption = None,
    ms_rule: MsRuleOption = MS_RULES[0],
    check_text: CheckTextOption = None,
    seq_len: SeqLen = SEQ_LEN,
    batch_size: BatchSize = BATCH_SIZE,
    dtype: OutDtype = None,
    force: Force = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Turn a ResLoRA CHECKPOINT into a plain PEFT LoRA on BASE (or a merged model, --merge).

    bs (block shortcut) merges exactly; is and ms use the estimators of docs/reslora.md.

    Examples:
      loramerge reslora fixtures/reslora/bs --base fixtures/bases/llama -o bs-lora
      loramerge reslora fixtures/reslora/is --base fixtures/bases/llama -o merged --merge
      loramerge reslora fixtures/reslora/ms -b fixtures/bases/llama --stats s.json -o ms-lora
    """
    from loramerge.jobs.reslora import ResLoraOptions
    from loramerge.jobs.reslora import reslora as run_reslora
    from loramerge.jobs.reslora_stats import TextOptions

    options = ResLoraOptions(norms, stats, ms_rule, rank, uniform_rank)
    text = TextOptions(check_text, seq_len, batch_size) if check_text is not None else None
    # the bar follows the weight-based norms' pass over the base, then the merge's
    label = "merging" if merge else "converting"
    with byte_progress(label, quiet or json_output) as progress:
        result = run_reslora(
            checkpoint, base, out, options, merge=merge, engine=engine, dtype=dtype,
            check_text=text, force=force, progress=progress,
        )  # fmt: skip
    if json_done(result, json_output):
        return
    summary = result.to_json()
    if not quiet:
        _print_blocks(summary)
    conversion = result.conversion
    what = "merged model" if merge else "PEFT adapter"
    ranks = sorted({block.rank for block in conversion.blocks})
    rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    show(
        f"wrote {out} ({what}, {len(conversion.blocks)} modules, {rank_text}): "
        f"{conversion.checkpoint.kind} blocks, {conversion.estimator}",
        quiet,
    )
    print_engine_report(result.engine, quiet)
    if result.check is not None:
        show(_check_line(summary["check"]), quiet)
    elif conversion.checkpoint.kind in ("is", "ms") or rank is not None:
        note("this merge is approximate: pass --check-text FILE to measure it", quiet)


def _format(values: dict[str, float]) -> str:
    return " ".join(f"{key}={value:.4g}" for key, value in values.items())


def _print_blocks(summary: dict[str, Any]) -> None:
    from rich.table import Table

    compressed = any(block["energy_kept"] < 1.0 for block in summary["blocks"])
    table = Table("module", "n", "rule", "r", "coefficients", "from norms", "exact")
    if compressed:
        table.add_column("energy kept")
    for block in summary["blocks"]:
        coefficients = _format(block["coefficients"])
        if block["stacked"]:
            coefficients = "stacks " + ",".join(str(j) for j in block["stacked"])
        row = [
            block["module"],
            str(block["index"]),
            block["rule"],
            str(block["rank"]),
            coefficients,
            _format(block["norms"]),
            "yes" if block["exact"] else "no",
        ]
        if compressed:
            row.append(f"{block['energy_kept']:.4%}")
        table.add_row(*row)
    stdout.print(table)


def _check_line(check: dict[str, Any]) -> str:
    return (
        f"check text ({check['tokens']} tokens): loss base {check['loss_base']:.5f}, "
        f"ResLoRA forward {check['loss_reslora']:.5f}, plain {check['loss_plain']:.5f}; "
        f"loss difference {check['loss_difference']:+.3e}, "
        f"max logit difference {check['max_logit_difference']:.3e}"
    )


def reslora_stats(
    checkpoint: Checkpoint,
    base: Base,
    text: Annotated[Path, typer.Option("--text", metavar="FILE", help="Calibration text (UTF-8).")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="OUT", help="Statistics JSON file to write."),
    ],
    seq_len: SeqLen = SEQ_LEN,
    batch_size: BatchSize = BATCH_SIZE,
    max_batches: MaxBatches = None,
    force: Force = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Record each ResLoRA block's mean input and middle-vector norms on calibration text.

    Runs the ResLoRA forward with the residual paths kept, as trained; `reslora --stats` reads
    the file.

    Example: loramerge reslora-stats fixtures/reslora/ms -b fixtures/bases/llama
    --text fixtures/text/train.txt -o ms-stats.json
    """
    from loramerge.jobs.reslora_stats import TextOptions, write_stats

    options = TextOptions(text, seq_len, batch_size, max_batches)
    data = write_stats(checkpoint, base, options, out, force=force)
    if json_output:
        print_json(data)
        return
    show(
        f"wrote {out} ({len(data['blocks'])} blocks, {data['sequences']} sequences of "
        f"{data['seq_len']} tokens, {data['type']} checkpoint)",
        quiet,
    )
