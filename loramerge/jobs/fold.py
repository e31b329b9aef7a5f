"""Folding a COLA chain: checks, then the merged model (rounded once or per link) or one adapter.

The chain is read in fold_load, the model written in fold_model, the adapter in fold_adapter;
fold_report holds what a fold reports (FoldResult).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loramerge.errors import UsageError, opt
from loramerge.io.dtypes import output_code
from loramerge.jobs.defaults import ROUNDINGS
from loramerge.jobs.fold_adapter import fold_to_adapter
from loramerge.jobs.fold_load import load_chain
from loramerge.jobs.fold_model import fold_to_model
from loramerge.jobs.fold_report import FoldResult
from loramerge.jobs.options import check_choice, check_rank, exclusive, needs
from loramerge.model.stream_stats import Progress


@dataclass(frozen=True)
class FoldOptions:
    """How to fold: into the base with `rounding`, or `as_lora` into one adapter (at most
    `rank` per module, for `engine`); `dtype` and `max_shard_bytes` of what is written."""

    rounding: str = "once"
    as_lora: bool = False
    rank: int | None = None
    engine: str | None = None
    dtype: str | None = None
    max_shard_bytes: int | None = None

    def check(self, base: str | Path | None) -> None:
        """Every check that needs no input: values in range, options that fit together."""
        check_choice(self.rounding, ROUNDINGS, "rounding")
        output_code(self.dtype)
        needs("engine", self.engine is not None, "as_lora", self.as_lora, "it rewrites an adapter")
        exclusive("rounding", self.rounding != "once", "as_lora", self.as_lora)
        exclusive("max_shard_size", self.max_shard_bytes is not None, "as_lora", self.as_lora)
        needs("rank", self.rank is not None, "as_lora", self.as_lora, "it compresses the adapter")
        if self.rank is not None:
            check_rank(self.rank)
        if base is None and not self.as_lora:
            raise UsageError(
                f"is needed to fold a chain into a model (or write one adapter: {opt('as_lora')})",
                option="base",
            )


def fold(
    links: Sequence[str | Path],
    out: str | Path,
    options: FoldOptions,
    *,
    base: str | Path | None = None,
    allow_nonfinite: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> FoldResult:
    """The `fold` command: check the options, read and check the chain, write OUT."""
    options.check(base)
    started = time.perf_counter()
    chain, warnings = load_chain(links, base, allow_nonfinite=allow_nonfinite)
    if options.as_lora:
        result = fold_to_adapter(
            chain,
            out,
            rank=options.rank,
            dtype=options.dtype,
            force=force,
            engine=options.engine,
            base=base,
        )
    else:
        assert base is not None
        result = fold_to_model(
            chain,
            base,
            out,
            rounding=options.rounding,
            dtype=options.dtype,
            force=force,
            max_shard_bytes=options.max_shard_bytes,
            progress=progress,
        )
    result.warnings = warnings + result.warnings
    result.seconds = time.perf_counter() - started
    return result
