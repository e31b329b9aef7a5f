"""`reslora`: a ResLoRA checkpoint on its base turned into a plain LoRA (written as an adapter or
merged into the base) by the merge rules of docs/rules.md section 4, optionally checked against
the ResLoRA forward on text.

The options and the rule they pick are in loramerge.jobs.reslora_options; `convert_reslora`,
which turns the checkpoint into a plain `Adapter`, is in loramerge.jobs.reslora_conversion. The
ResLoRA forward that measures statistics and merge loss is run by loramerge.jobs.reslora_stats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramerge.formats.registry import check_output_name
from loramerge.io.atomic import check_output_target
from loramerge.io.dtypes import output_code
from loramerge.jobs.adapter_output import check_adapter_output, choose_output, write_adapter
from loramerge.jobs.merge import merge_adapter
from loramerge.jobs.options import exclusive, needs
from loramerge.jobs.reslora_conversion import ResLoraConversion, convert_reslora
from loramerge.jobs.reslora_options import ResLoraOptions
from loramerge.jobs.reslora_stats import CheckResult, TextOptions, check_batches, prepare_text
from loramerge.model.folder import open_base
from loramerge.model.stream_stats import Progress, within


@dataclass
class ResLoraResult:
    """What `reslora` wrote and how it merged each block."""

    out: Path
    conversion: ResLoraConversion
    output: str  # "peft" (or the engine's format) or "merged"
    bytes_written: int = 0
    warnings: list[str] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)
    check: CheckResult | None = None

    def to_json(self) -> dict[str, Any]:
        conversion = self.conversion
        summary: dict[str, Any] = {
            "out": str(self.out),
            "type": conversion.checkpoint.kind,
            "estimator": conversion.estimator,
            "output": self.output,
            "blocks": [vars(block) for block in conversion.blocks],
        }
        if self.output == "merged":
            summary["bytes"] = self.bytes_written
        summary["warnings"] = self.warnings
        if self.engine:
            summary["engine"] = self.engine
        if self.check is not None:
            summary["check"] = self.check.as_dict()
        return summary


def reslora(
    checkpoint: str | Path,
    base: str | Path,
    out: str | Path,
    options: ResLoraOptions | None = None,
    *,
    merge: bool = False,
    engine: str | None = None,
    dtype: str | None = None,
    check_text: TextOptions | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ResLoraResult:
    """The `reslora` command: every option and input checked, then the plain LoRA written as an
    adapter (for `engine`) or, with `merge`, merged into the base; `check_text` then runs the
    ResLoRA forward and the written plain model on that text."""
    options = options or ResLoraOptions()
    options.check()
    needs("dtype", dtype is not None, "merge", merge, "it sets the merged model's dtype")
    exclusive("engine", engine is not None, "merge", merge)
    output_code(dtype)
    out, inputs = Path(out), [Path(checkpoint), Path(base)]
    output = None if merge else choose_output(None, engine, base)
    if output is None:
        check_output_name(out, None)
        check_output_target(out, inputs, force)
    else:
        check_adapter_output(out, output, inputs, force)
    batches = prepare_text(base, check_text) if check_text is not None else None
    # one bar over the norms' pass over the base and the merge's
    merging = _base_bytes(base) if output is None and progress is not None else 0
    conversion = convert_reslora(checkpoint, base, options, within(progress, after=merging))
    result = ResLoraResult(out, conversion, "merged" if output is None else output.entry.name)
    if output is None:
        merged = merge_adapter(
            conversion.adapter, base, out, dtype=dtype, force=force,
            progress=within(progress, before=conversion.bytes_read),
            extra_inputs=[Path(checkpoint)],
        )  # fmt: skip
        result.bytes_written, result.warnings = merged.bytes_written, merged.warnings
    else:
        result.engine = write_adapter(conversion.adapter, out, output, force=force, inputs=inputs)
    if batches is not None:
        result.check = check_batches(conversion, base, batches, merged=out if merge else None)
    return result


def _base_bytes(base: str | Path) -> int:
    """The base's tensor bytes: about what a merge writes."""
    return sum(entry.nbytes for _, entry in open_base(base).tensors())
