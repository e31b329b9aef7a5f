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
    note,
    print_engine_report,
    print_json,
    stdout,
    user_errors,
    warn,
)

Checkpoint = Annotated[
    Path,
    typer.Argument(
        help="ResLoRA checkpoint: a folder with reslora_config.json + pytorch_model_lora.bin, a "
        "trainer folder whose config.json has resconfig, or a .safetensors file beside its config."
    ),
]
Base = Annotated[
    str, typer.Option("--base", "-b", help="Base model the checkpoint was trained on.")
]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence cut from the text.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")]
MaxBatches = Annotated[
    int | None, typer.Option("--max-batches", help="Use at most this many batches of the text.")
]


def reslora(
    checkpoint: Checkpoint,
    base: Base,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output: a PEFT folder, or with --merge a model.")
    ],
    merge: Annotated[
        bool, typer.Option("--merge", help="Write the fully merged model instead of a LoRA.")
    ] = False,
    engine: Engine = None,
    uniform_rank: Annotated[
        bool,
        typer.Option(
            "--uniform-rank", help="bs: zero-pad every module to the largest rank (exact)."
        ),
    ] = False,
    rank: Annotated[
        int | None,
        typer.Option("--rank", help="Compress every module to this rank (QR-core SVD, lossy)."),
    ] = None,
    norms: Annotated[
        str | None,
        typer.Option(
            "--norms",
            help="Norms behind the is/ms coefficients: weights (default; the paper's rule from "
            "the base weights), official (is only: the official code's ||W + (BA)^T||), or "
            "inputs (calibration statistics from --stats; the default when --stats is given).",
        ),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option("--stats", help="Statistics file written by `loramerge reslora-stats`."),
    ] = None,
    ms_rule: Annotated[
        str,
        typer.Option(
            "--ms-rule", help="ms: amerge (merge the previous A's) or scalar (needs --stats)."
        ),
    ] = "amerge",
    check_text: Annotated[
        Path | None,
        typer.Option(
            "--check-text",
            help="Run the ResLoRA forward and the written plain model on this text and report "
            "the loss difference and the max logit difference.",
        ),
    ] = None,
    seq_len: SeqLen = 128,
    batch_size: BatchSize = 8,
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
    with user_errors(debug):
        from loramerge.errors import OptionError
        from loramerge.jobs.adapter_output import write_adapter
        from loramerge.jobs.merge import dtype_code_of, merge_adapter
        from loramerge.jobs.reslora import ResLoraOptions, convert_reslora
        from loramerge.jobs.reslora_stats import check_text as run_check

        if dtype is not None and not merge:
            raise OptionError("--dtype sets the merged model's dtype; it needs --merge")
        if engine is not None and merge:
            raise OptionError("--engine rewrites an adapter; with --merge the output is a model")
        dtype_code_of(dtype)
        options = ResLoraOptions(
            norms=norms, stats=stats, ms_rule=ms_rule, rank=rank, uniform_rank=uniform_rank
        )
        conversion = convert_reslora(checkpoint, base, options)
        summary: dict[str, Any] = {
            "out": str(out),
            "type": conversion.checkpoint.kind,
            "estimator": conversion.estimator,
            "output": "merged" if merge else "peft",
            "blocks": [vars(block) for block in conversion.blocks],
        }
        if merge:
            with byte_progress("merging", quiet or json_output) as progress:
                result = merge_adapter(
                    conversion.adapter,
                    base,
                    out,
                    dtype=dtype,
                    force=force,
                    progress=progress,
                    extra_inputs=[checkpoint],
                )
            summary["bytes"] = result.bytes_written
            summary["warnings"] = result.warnings
        else:
            inputs = [checkpoint] + ([Path(base)] if Path(base).exists() else [])
            to = "peft"
            if engine is not None:
                from loramerge.engines.profiles import engine_profile

                to = engine_profile(engine).formats[0]
            report: dict[str, Any] = {}
            write_adapter(
                conversion.adapter, out, to, force=force, inputs=inputs, engine=engine, base=base,
                report=report,
            )  # fmt: skip
            summary["warnings"] = []
            if report:
                summary["engine"] = report
        if check_text is not None:
            check = run_check(
                conversion,
                base,
                check_text,
                merged=out if merge else None,
                seq_len=seq_len,
                batch_size=batch_size,
            )
            summary["check"] = check.as_dict()
        if json_output:
            print_json(summary)
            return
        for message in summary["warnings"]:
            warn(message, quiet)
        _print_blocks(summary)
        what = "merged model" if merge else "PEFT adapter"
        ranks = sorted({block.rank for block in conversion.blocks})
        rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        stdout.print(
            f"wrote {out} ({what}, {len(conversion.blocks)} modules, {rank_text}): "
            f"{conversion.checkpoint.kind} blocks, {conversion.estimator}"
        )
        print_engine_report(summary.get("engine", {}), quiet)
        if "check" in summary:
            _print_check(summary["check"])
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


def _print_check(check: dict[str, Any]) -> None:
    stdout.print(
        f"check text ({check['tokens']} tokens): loss base {check['loss_base']:.5f}, "
        f"ResLoRA forward {check['loss_reslora']:.5f}, plain {check['loss_plain']:.5f}; "
        f"loss difference {check['loss_difference']:+.3e}, "
        f"max logit difference {check['max_logit_difference']:.3e}"
    )


def reslora_stats(
    checkpoint: Checkpoint,
    base: Base,
    text: Annotated[Path, typer.Option("--text", help="Calibration text (UTF-8).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Statistics JSON file to write.")],
    seq_len: SeqLen = 128,
    batch_size: BatchSize = 8,
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
    with user_errors(debug):
        from loramerge.formats.reslora_stats import stats_json
        from loramerge.io.atomic import atomic_output, check_output_target
        from loramerge.jobs.reslora_stats import collect_stats

        inputs = [checkpoint, text] + ([Path(base)] if Path(base).exists() else [])
        check_output_target(out, inputs, force)
        data = collect_stats(
            checkpoint,
            base,
            text,
            seq_len=seq_len,
            batch_size=batch_size,
            max_batches=max_batches,
        )
        with atomic_output(out, is_dir=False) as temp:
            temp.write_text(stats_json(data))
        if json_output:
            print_json(data)
            return
        stdout.print(
            f"wrote {out} ({len(data['blocks'])} blocks, {data['sequences']} sequences of "
            f"{data['seq_len']} tokens, {data['type']} checkpoint)"
        )
