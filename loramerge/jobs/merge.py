"""`merge`: an adapter merged into its base model folder: plan from headers, stream, finish the
folder. `merge_adapter` is the building block the other jobs that write a model share."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter
from loramerge.adapter_checks import check_values, read_checked
from loramerge.errors import LoramergeError, opt
from loramerge.formats.registry import ReadOptions, check_output_name
from loramerge.io.atomic import atomic_output, check_output_target
from loramerge.io.dtypes import output_code
from loramerge.jobs.merged_folder import check_written, write_folder_files
from loramerge.jobs.pipeline_base import one_model
from loramerge.model.folder import BaseModel, open_base
from loramerge.model.plan import MergePlan
from loramerge.model.planner import plan_merge
from loramerge.model.stream_stats import ERASED_SHARE, ModuleStats, Progress
from loramerge.ops import torch_blas

KEEP_IT = f"pass {opt('dtype')} float32 to keep it"


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan
    modules: dict[str, ModuleStats]
    bytes_written: int
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "shards": [s.file_name for s in self.plan.shards],
            "bytes": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "tensors": self.plan.counts(),
            "untied_embeddings": self.plan.untied,
            "modules": {
                name: {"tensor": s.tensor, "changed_share": round(s.changed_share, 6)}
                for name, s in self.modules.items()
            },
            "warnings": self.warnings,
        }


def rounding_warning(where: str, kept: str, dtype: str | None, remedy: str = KEEP_IT) -> str:
    """The one warning for an update that rounding to the output dtype mostly erased: `kept`
    is the share of the update's elements that still changed the weights ("12%", "5%-20%")."""
    return (
        f"{where}: rounding to {dtype or 'the base dtype'} left only {kept} of the update's "
        f"elements changed; {remedy}"
    )


def erased_warnings(modules: dict[str, ModuleStats], dtype: str | None) -> list[str]:
    """A rounding warning for each module whose update rounding mostly erased."""
    return [
        rounding_warning(stats.module, f"{stats.changed_share:.0%}", dtype)
        for stats in modules.values()
        if stats.elements and stats.changed_share < ERASED_SHARE
    ]


def merge(
    source: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    fmt: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    allow_nonfinite: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    component: str | None = None,
    alpha: float | None = None,
) -> MergeResult:
    """The `merge` command: read and check the adapter at `source`, merge it into `base`.
    `alpha` is the training lora_alpha of an input that stores none."""
    output_code(dtype)
    check_output_name(Path(out), None)
    torch_blas.preload()  # the engine's BLAS loads while the adapter is read and planned
    # every tensor is checked for NaN and Inf alongside planning and streaming: before the
    # merged folder is renamed into place, and before any later error is reported
    adapter = _read(source, fmt, base, alpha, allow_nonfinite=True)
    values = None if allow_nonfinite else ValueCheck(adapter)
    try:
        return merge_adapter(
            adapter,
            base,
            out,
            dtype=dtype,
            force=force,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
            component=component,
            before_commit=values.wait if values is not None else None,
        )
    except LoramergeError:
        if values is not None:
            values.wait()  # the adapter's own error comes first, as when it is checked first
        raise
    finally:
        if values is not None:
            values.wait(raising=False)


class ValueCheck:
    """`check_values` of an adapter on a thread of its own; `wait` raises what it found."""

    def __init__(self, adapter: Adapter) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(adapter,), daemon=True)
        self._thread.start()

    def _run(self, adapter: Adapter) -> None:
        try:
            check_values(adapter)
        except BaseException as exc:
            self._error = exc

    def wait(self, raising: bool = True) -> None:
        self._thread.join()
        if raising and self._error is not None:
            raise self._error


def preview(
    source: str | Path,
    base: str | Path,
    *,
    fmt: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    allow_nonfinite: bool = False,
    component: str | None = None,
    alpha: float | None = None,
) -> MergePlan:
    """`merge --dry-run`: the plan a merge would follow, from headers alone."""
    output_code(dtype)
    adapter = _read(source, fmt, base, alpha, allow_nonfinite)
    return preview_merge(
        adapter, base, dtype=dtype, max_shard_bytes=max_shard_bytes, component=component
    )


def _read(
    source: str | Path,
    fmt: str | None,
    base: str | Path,
    alpha: float | None,
    allow_nonfinite: bool,
) -> Adapter:
    """The adapter, read with what the base and the user supply for formats that store less
    (torchtune's head counts and alpha, VeRA's input sizes, official DyLoRA's alpha)."""
    options = ReadOptions(alpha=alpha, base=base)
    return read_checked(source, fmt, options, allow_nonfinite=allow_nonfinite)


def merge_adapter(
    adapter: Adapter,
    base_ref: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    max_shard_bytes: int | None = None,
    progress: Progress | None = None,
    extra_inputs: list[Path] | None = None,
    component: str | None = None,
    before_commit: Callable[[], None] | None = None,
) -> MergeResult:
    """Write the fully merged model of `adapter` on `base_ref` into the folder `out`.

    A pipeline adapter (kohya, LyCORIS, diffusers) merges one model at a time: `component`, or
    the one the base folder is named after (`<pipeline>/unet`). `before_commit` runs once every
    file is written, before the folder is renamed into place (raising there writes nothing)."""
    started = time.perf_counter()
    out = Path(out)
    check_output_name(out, None)
    plan, base = planned_merge(adapter, base_ref, component, dtype, max_shard_bytes)
    inputs = [base.root, *(extra_inputs or [])]
    if adapter.source_path:
        inputs.append(Path(adapter.source_path))
    check_output_target(out, inputs, force)
    stream = merge_engine(plan, base)
    with atomic_output(out) as temp:
        streamed = stream(plan, base, temp, progress)
        write_folder_files(base, plan, temp)
        check_written(plan, temp)
        if before_commit is not None:
            before_commit()
    warnings = erased_warnings(streamed.modules, dtype)
    seconds = time.perf_counter() - started
    return MergeResult(out, plan, streamed.modules, streamed.bytes_written, warnings, seconds)


def preview_merge(
    adapter: Adapter,
    base_ref: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    component: str | None = None,
) -> MergePlan:
    """The plan `merge_adapter` would follow (nothing is written)."""
    adapter, root = one_model(adapter, base_ref, component, "planning its merge")
    base = open_base(root)
    adapter = _rebuilt(adapter, base)
    return plan_merge(
        base,
        adapter,
        dtype=output_code(dtype),
        max_shard_bytes=max_shard_bytes,
    )


def planned_merge(
    adapter: Adapter,
    base_ref: str | Path,
    component: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> tuple[MergePlan, BaseModel]:
    """The plan of merging `adapter` into `base_ref` (one model of a pipeline: `component`, or
    the one the base folder is named after), for the original base where training changed it."""
    adapter, root = one_model(adapter, base_ref, component, "merging it")
    base = open_base(root)
    adapter = _rebuilt(adapter, base)
    plan = plan_merge(base, adapter, dtype=output_code(dtype), max_shard_bytes=max_shard_bytes)
    return plan, base


def _rebuilt(adapter: Adapter, base: BaseModel) -> Adapter:
    """The adapter for the original base where its training changed the base (PiSSA, ...)."""
    if adapter.base_init is None:
        return adapter
    from loramerge.model.base_init import rebuild_for_original_base

    return rebuild_for_original_base(adapter, base)


def merge_engine(plan: MergePlan, base: BaseModel):
    """The engine that writes the plan: the torch-free one (model.fast_stream) where it can
    and this machine computes torch's bits with it (model.fast_checks), else torch's
    (model.stream). Both write the same bytes. LORAMERGE_ENGINE=torch picks torch's."""
    from loramerge.model import fast_checks, fast_stream, fast_support

    wanted = os.environ.get("LORAMERGE_ENGINE", "auto")
    if wanted != "torch" and fast_support.unsupported(plan, base) is None and fast_checks.trusted():
        return fast_stream.stream_fast
    from loramerge.model.stream import stream_plan

    return stream_plan
