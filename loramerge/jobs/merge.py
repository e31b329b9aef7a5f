"""Merging an adapter into a base model folder: plan from headers, stream, finish the folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from loramerge.adapter import Adapter
from loramerge.errors import OptionError, OutputError
from loramerge.io.atomic import atomic_output, check_output_target
from loramerge.io.safetensors_header import read_header
from loramerge.jobs.pipeline_base import one_model
from loramerge.model.folder import INDEX_NAME, BaseModel, open_base
from loramerge.model.plan import DTYPE_CODES, MergePlan, plan_merge
from loramerge.model.stream import ERASED_SHARE, ModuleStats, Progress, stream_plan


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan
    modules: dict[str, ModuleStats]
    bytes_written: int
    warnings: list[str] = field(default_factory=list)


def dtype_code_of(name: str | None) -> str | None:
    """ "bfloat16" -> "BF16"; None keeps each tensor's dtype."""
    if name is None:
        return None
    try:
        return DTYPE_CODES[name]
    except KeyError:
        choices = ", ".join(DTYPE_CODES)
        raise OptionError(f"unknown dtype {name!r}; choose one of {choices}") from None


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
) -> MergeResult:
    """Write the fully merged model of `adapter` on `base_ref` into the folder `out`.

    A pipeline adapter (kohya, LyCORIS, diffusers) merges one model at a time: `component`, or
    the one the base folder is named after (`<pipeline>/unet`)."""
    out = Path(out)
    adapter, root = one_model(adapter, base_ref, component, "merging it")
    base = open_base(root)
    plan = plan_merge(
        base.tensors(),
        base.config,
        adapter,
        dtype=dtype_code_of(dtype),
        max_shard_bytes=max_shard_bytes,
    )
    inputs = [base.root, *(extra_inputs or [])]
    if adapter.source_path:
        inputs.append(Path(adapter.source_path))
    check_output_target(out, inputs, force)
    with atomic_output(out) as temp:
        streamed = stream_plan(plan, base, adapter, temp, progress)
        write_folder_files(base, plan, temp)
        check_written(plan, temp)
    warnings = [
        f"{stats.module}: rounding to the output dtype kept only {stats.changed_share:.0%} of the "
        "update's elements; pass --dtype float32 to keep it"
        for stats in streamed.modules.values()
        if stats.elements and stats.changed_share < ERASED_SHARE
    ]
    return MergeResult(out, plan, streamed.modules, streamed.bytes_written, warnings)


def write_folder_files(base: BaseModel, plan: MergePlan, folder: Path) -> None:
    """The index, the (updated) config and the small files that make it a model folder."""
    if len(plan.shards) > 1 or (base.has_index and len(plan.shards) == len(base.shard_names)):
        weight_map = {t.name: s.file_name for s in plan.shards for t in s.tensors}
        index = {
            "metadata": {"total_size": plan.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for path in base.extra_files():
        if path.name == "config.json":
            continue
        shutil.copyfile(path, folder / path.name)
    config_path = base.root / "config.json"
    if not config_path.exists():
        return
    updates = dict(plan.config_updates)
    if not updates and "quantization_config" not in base.config:
        shutil.copyfile(config_path, folder / "config.json")
        return
    config = {k: v for k, v in base.config.items() if k != "quantization_config"}
    config.update(updates)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_written(plan: MergePlan, folder: Path) -> None:
    """Re-read every written shard's header and check it against the plan."""
    for shard in plan.shards:
        header = read_header(folder / shard.file_name)
        expected = [(t.name, t.dtype, t.shape) for t in shard.tensors]
        found = [(e.name, e.dtype, e.shape) for e in header.entries.values()]
        if expected != found:
            raise OutputError(
                "a written shard does not match its plan", path=folder / shard.file_name
            )


def preview_merge(
    adapter: Adapter,
    base_ref: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    component: str | None = None,
) -> MergePlan:
    """The plan `merge_adapter` would follow, from headers alone (nothing is written)."""
    adapter, root = one_model(adapter, base_ref, component, "planning its merge")
    base = open_base(root)
    return plan_merge(
        base.tensors(),
        base.config,
        adapter,
        dtype=dtype_code_of(dtype),
        max_shard_bytes=max_shard_bytes,
    )
