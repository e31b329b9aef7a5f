"""`reslora-stats` and the ResLoRA merge check: the ResLoRA forward run on text, for the
calibration statistics of the input-based estimators and the loss a merge costs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loramerge.formats import reslora_checkpoint as reslora_format
from loramerge.formats.reslora_stats import STATS_FORMAT, STATS_VERSION, stats_json
from loramerge.io.atomic import atomic_output, check_output_target
from loramerge.jobs.defaults import BATCH_SIZE, SEQ_LEN
from loramerge.jobs.options import check_count
from loramerge.model.folder import open_base
from loramerge.model.hf_runtime import load_model, text_batches
from loramerge.model.lora_forward import PlainForward
from loramerge.model.reslora_fit import check_against_base
from loramerge.model.reslora_forward import ResLoraForward

if TYPE_CHECKING:
    from loramerge.jobs.reslora_conversion import ResLoraConversion


@dataclass(frozen=True)
class TextOptions:
    """Text to run models on, cut into `seq_len`-token sequences, `batch_size` per forward,
    at most `max_batches` batches."""

    text: Path
    seq_len: int = SEQ_LEN
    batch_size: int = BATCH_SIZE
    max_batches: int | None = None

    def check(self) -> None:
        check_count(self.seq_len, "seq_len", least=2)
        check_count(self.batch_size, "batch_size")
        if self.max_batches is not None:
            check_count(self.max_batches, "max_batches")


def prepare_text(base_ref: str | Path, text: TextOptions) -> list[torch.Tensor]:
    """The text read and tokenised by the base's tokenizer, in batches of token ids; done before
    anything is written, so that a text that cannot be used leaves no output behind."""
    text.check()
    root = open_base(base_ref).root
    return text_batches(root, Path(text.text), text.seq_len, text.batch_size, text.max_batches)


def write_stats(
    checkpoint_path: str | Path,
    base_ref: str | Path,
    text: TextOptions,
    out: str | Path,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """The `reslora-stats` command: the statistics written to the JSON file `out`."""
    out = Path(out)
    inputs = [Path(checkpoint_path), Path(text.text), Path(base_ref)]
    check_output_target(out, inputs, force)
    data = collect_stats(checkpoint_path, base_ref, text)
    with atomic_output(out, is_dir=False) as temp:
        temp.write_text(stats_json(data))
    return data


def collect_stats(
    checkpoint_path: str | Path, base_ref: str | Path, text: TextOptions
) -> dict[str, Any]:
    """Run the ResLoRA forward on calibration text; the statistics file's content."""
    checkpoint = reslora_format.read(checkpoint_path)
    base = open_base(base_ref)
    check_against_base(checkpoint, base)
    batches = prepare_text(base.root, text)
    model = load_model(base.root)
    forward = ResLoraForward(model, checkpoint, record=True)
    with torch.no_grad(), forward:
        for batch in batches:
            model(input_ids=batch)
    blocks = {}
    for chain, n, block in checkpoint.blocks():
        total_in, total_mid, count = forward.records[block.path]
        blocks[block.path] = {
            "chain": chain.name,
            "index": n,
            "layer": block.layer,
            "input_norm": total_in / count,
            "middle_norm": total_mid / count,
            "batches": count,
        }
    return {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "checkpoint": str(checkpoint_path),
        "base": str(base_ref),
        "text": str(text.text),
        "type": checkpoint.kind,
        "res_flag": checkpoint.config.res_flag,
        "seq_len": int(batches[0].shape[1]),
        "batch_size": text.batch_size,
        "batches": len(batches),
        "sequences": sum(int(b.shape[0]) for b in batches),
        "tokens": sum(int(b.numel()) for b in batches),
        "blocks": blocks,
    }


@dataclass
class CheckResult:
    """ResLoRA forward vs the merged plain model on one text (losses are per-token means)."""

    plain: str
    tokens: int
    sequences: int
    loss_base: float
    loss_reslora: float
    loss_plain: float
    loss_difference: float  # plain - reslora
    max_logit_difference: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_batches(
    conversion: ResLoraConversion,
    base_ref: str | Path,
    batches: list[torch.Tensor],
    *,
    merged: Path | None = None,
) -> CheckResult:
    """Loss and logits of the ResLoRA forward (residual paths kept) against the plain model.

    The plain model is the merged folder `merged` when given (what ships, rounding included),
    else the plain adapter applied to the float32 base (what PEFT computes).
    """
    base = open_base(base_ref)
    model = load_model(base.root)
    plain_model = load_model(merged) if merged is not None else None
    residual = ResLoraForward(model, conversion.checkpoint)
    plain_hooks = PlainForward(model, conversion.adapter)
    totals = {"base": 0.0, "reslora": 0.0, "plain": 0.0}
    tokens, worst = 0, 0.0
    with torch.no_grad():
        for batch in batches:
            base_logits = model(input_ids=batch).logits
            with residual:
                res_logits = model(input_ids=batch).logits
            if plain_model is not None:
                plain_logits = plain_model(input_ids=batch).logits
            else:
                with plain_hooks:
                    plain_logits = model(input_ids=batch).logits
            for key, logits in (("base", base_logits), ("reslora", res_logits)):
                totals[key] += _loss_sum(logits, batch)
            totals["plain"] += _loss_sum(plain_logits, batch)
            tokens += batch.shape[0] * (batch.shape[1] - 1)
            worst = max(worst, float((res_logits - plain_logits).abs().max()))
    losses = {key: value / tokens for key, value in totals.items()}
    return CheckResult(
        plain=f"merged folder {merged}" if merged is not None else "plain adapter on the base",
        tokens=tokens,
        sequences=sum(int(b.shape[0]) for b in batches),
        loss_base=losses["base"],
        loss_reslora=losses["reslora"],
        loss_plain=losses["plain"],
        loss_difference=losses["plain"] - losses["reslora"],
        max_logit_difference=worst,
    )


def _loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token cross entropy, in float64."""
    predicted = logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.float64)
    return float(
        torch.nn.functional.cross_entropy(predicted, ids[:, 1:].reshape(-1), reduction="sum")
    )
