"""Folding a COLA chain into one adapter: exact, or reduced to a rank, optionally for an engine."""

from __future__ import annotations

from pathlib import Path

from loramerge.formats.cola_chain import Chain
from loramerge.io.dtypes import output_code
from loramerge.io.safetensors_header import torch_dtype
from loramerge.jobs.adapter_output import check_adapter_output, choose_output, write_adapter
from loramerge.jobs.fold_report import FoldResult, link_reports


def fold_to_adapter(
    chain: Chain,
    out: str | Path,
    *,
    rank: int | None = None,
    dtype: str | None = None,
    force: bool = False,
    engine: str | None = None,
    base: str | Path | None = None,
) -> FoldResult:
    """Write one PEFT adapter equal to the whole chain: exact, or reduced to `rank`.

    `engine` rewrites it for an inference engine first (see write_adapter); the result's
    `engine` holds what that changed.
    """
    code = output_code(dtype or "float32")
    out = Path(out)
    output = choose_output(None, engine, base)
    check_adapter_output(out, output, chain.inputs, force)
    from loramerge.ops.cola_fold import fold_chain  # torch: imported only for this path

    reports, chain_norms = link_reports(chain)
    folded = fold_chain(
        [(link.adapter, link.weight) for link in chain.links], rank=rank, dtype=torch_dtype(code)
    )
    engine_report = write_adapter(folded.adapter, out, output, force=force, inputs=chain.inputs)
    return FoldResult(out, reports, chain_norms, folded=folded, engine=engine_report)
