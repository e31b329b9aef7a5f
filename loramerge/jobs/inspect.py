"""`inspect`: what an adapter holds, and with a base, how large its updates are and what
rounding keeps."""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import Adapter, DenseUpdate, LoraModule, ModuleKind
from loramerge.adapter_checks import read_checked
from loramerge.errors import opt
from loramerge.formats.components import components, for_component, select
from loramerge.formats.derived_factors import merge_only_modules
from loramerge.formats.dylora import is_dylora, unit_of
from loramerge.formats.provenance import read_as
from loramerge.formats.registry import ReadOptions
from loramerge.io.safetensors_header import dtype_code, torch_dtype
from loramerge.jobs.merge import rounding_warning
from loramerge.jobs.pipeline_base import component_root, fold_lycoris_dora, model_config
from loramerge.model.dense_tiles import dense_support
from loramerge.model.folder import open_base
from loramerge.model.merged_tiles import merged_tiles
from loramerge.model.plan import Action, TensorPlan
from loramerge.model.planner import plan_merge
from loramerge.model.rename import rename_to_base
from loramerge.model.sources import Sources, sources_for
from loramerge.model.stream import ERASED_SHARE, Progress, count_changed
from loramerge.ops.lowrank import update_frobenius_norm
from loramerge.ops.rank_truncation import RankSize, dylora_rank_profile


@dataclass
class ModuleReport:
    path: str
    kind: str
    r: int
    alpha: float
    scale: float
    dtype: str
    update_norm: float | None  # None: a parameter wrapper the base has not resolved
    dora: bool = False
    component: str | None = None  # the pipeline model of a multi-model adapter
    merge_only: bool = False  # its exact LoRA form is no smaller than the dense update
    rule: str | None = None  # a dense update (no rank): its method and rule, "IA3 scale_out"
    base_tensor: str | None = None
    base_dtype: str | None = None
    base_norm: float | None = None
    relative_update: float | None = None
    changed_share: float | None = None


@dataclass
class AdapterReport:
    path: str
    format: str
    base_model: str | None
    module_count: int
    ranks: list[int]
    alphas: list[float]
    scales: list[float]
    dtypes: list[str]
    parameter_count: int
    modules_to_save: list[str]
    modules: list[ModuleReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dylora_ranks: list[RankSize] = field(default_factory=list)  # DyLoRA: update size per rank b
    # what the reader read: tool, algorithm, scale rule and notes (loramerge.read.* metadata)
    read_as: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def inspect(
    path: str | Path,
    base: str | Path | None = None,
    *,
    fmt: str | None = None,
    alpha: float | None = None,
    progress: Progress | None = None,
    component: str | None = None,
) -> AdapterReport:
    """The `inspect` command: read and check the adapter at `path`, describe it; with `base`,
    measure every update against its weight (`progress` gets bytes of base weights read).
    `component` narrows a pipeline adapter to one model (needed with a base)."""
    config = model_config(base) if base is not None else None
    adapter = read_checked(path, fmt, ReadOptions(alpha=alpha, base_config=config, base=base))
    return inspect_adapter(adapter, base, progress, component)


def inspect_adapter(
    adapter: Adapter,
    base_ref: str | Path | None = None,
    progress: Progress | None = None,
    component: str | None = None,
) -> AdapterReport:
    adapter = for_component(adapter, component)
    if base_ref is not None:
        if len(components(adapter)) > 1:
            adapter = select(adapter, None)  # refuses, naming the components
        base_ref = component_root(base_ref, components(adapter)[0])
        adapter = rename_to_base(adapter, base_ref)  # kinds and expert stacks from the base
        adapter = fold_lycoris_dora(adapter, base_ref, "measuring it against the base")
    merge_only = merge_only_modules(adapter)
    lora = [
        _module_report(key, module, key in merge_only) for key, module in adapter.modules.items()
    ]
    modules = lora + [dense_report(key, update) for key, update in adapter.dense_updates.items()]
    report = AdapterReport(
        path=adapter.source_path or "",
        format=adapter.source_format,
        base_model=adapter.base_model,
        module_count=len(modules),
        ranks=sorted({m.r for m in lora}),
        alphas=sorted({m.alpha for m in lora}),
        scales=sorted({round(m.scale, 6) for m in lora}),
        dtypes=sorted({m.dtype for m in modules}),
        parameter_count=adapter.parameter_count(),
        modules_to_save=sorted(adapter.modules_to_save),
        read_as=read_as(adapter),
        modules=modules,
    )
    report.warnings += _merge_only_warnings(adapter, merge_only)
    if is_dylora(adapter):
        report.dylora_ranks = dylora_rank_profile(adapter, unit_of(adapter))
    if base_ref is not None:
        _measure_against_base(adapter, base_ref, report, progress)
    return report


def _module_report(key: str, module: LoraModule, merge_only: bool) -> ModuleReport:
    return ModuleReport(
        path=key,
        kind=module.kind.value,
        r=module.r,
        alpha=module.alpha,
        scale=module.scale,
        dtype=dtype_code(module.lora_A.dtype),
        update_norm=update_norm(module),
        dora=module.magnitude is not None,
        component=module.component,
        merge_only=merge_only,
    )


def _merge_only_warnings(adapter: Adapter, merge_only: dict[str, str]) -> list[str]:
    """What inspect says of modules that can only be merged (no low-rank form)."""
    found = []
    if merge_only:
        key, reason = next(iter(merge_only.items()))
        found.append(
            f"{len(merge_only)} modules have no low-rank form and can only be merged, e.g. "
            f"{key}: {reason}"
        )
    if adapter.dense_updates:
        update = next(iter(adapter.dense_updates.values()))
        found.append(
            f"{len(adapter.dense_updates)} modules are {update.method} updates with no LoRA "
            f"form ({update.why}): they can only be merged"
        )
    return found


def dense_report(key: str, update: DenseUpdate) -> ModuleReport:
    """A dense update's row: no rank, alpha or scale; its size is measured against the base."""
    dtypes = {tensor.dtype for tensor in update.tensors.values() if tensor.dtype.is_floating_point}
    return ModuleReport(
        path=key,
        kind=update.kind.value,
        r=0,
        alpha=0.0,
        scale=1.0,
        dtype=",".join(sorted(dtype_code(d) for d in dtypes)),
        update_norm=None,
        component=update.component,
        merge_only=True,
        rule=f"{update.method} {update.rule}",
    )


def update_norm(module: LoraModule) -> float | None:
    """||s B A||_F from the factors; over all experts of a stack (root of the sum of squares);
    None for a parameter wrapper whose experts only the base's architecture can count."""
    if module.kind is ModuleKind.PARAMETER and module.parameter is None:
        return None
    experts = range(module.experts) if module.experts > 1 else [None]
    squares = 0.0
    for expert in experts:
        lora_b, lora_a = module.factors(expert=expert)
        squares += update_frobenius_norm(lora_b, lora_a, module.scale) ** 2
    return math.sqrt(squares)


def _measure_against_base(
    adapter: Adapter, base_ref: str | Path, report: AdapterReport, progress: Progress | None
) -> None:
    base = open_base(base_ref)
    plan = plan_merge(base, adapter)
    adapter = plan.adapter
    by_path = {m.path: m for m in report.modules}
    merged = [t for shard in plan.shards for t in shard.tensors if t.action is Action.MERGE]
    total, done = sum(t.nbytes for t in merged), 0
    with ExitStack() as stack:
        sources = sources_for(plan, base, stack)
        for tensor in merged:
            entry = by_path[tensor.module or ""]
            if tensor.kind is not None:
                entry.kind = tensor.kind.value
            _measure(entry, tensor, sources, adapter)
            if entry.changed_share is not None and entry.changed_share < ERASED_SHARE:
                kept = f"{entry.changed_share:.0%}"
                remedy = f"merge with {opt('dtype')} float32 to keep it"
                report.warnings.append(rounding_warning(entry.path, kept, tensor.dtype, remedy))
            done += tensor.nbytes
            if progress is not None:
                progress(done, total)


def _measure(entry: ModuleReport, tensor: TensorPlan, sources: Sources, adapter: Adapter) -> None:
    """The base weight's norm and the share of elements the update changes after rounding."""
    out_dtype = torch_dtype(tensor.dtype)
    squares, changed, elements, moved = 0.0, 0, 0, 0.0
    for base_rows, values in merged_tiles(tensor, sources, adapter):
        base = base_rows.to(torch.float64)
        squares += float(base.square().sum())
        if tensor.dense:  # no factors: the update is what the rule did to the weight
            moved += float((values.to(torch.float64) - base).square().sum())
        changed += count_changed(values.to(out_dtype), base_rows.to(out_dtype))
        elements += values.numel()
        sources.give(base_rows, values)
    if tensor.dense:
        entry.update_norm = moved**0.5
        elements = dense_support(tensor, adapter) or elements
    entry.base_tensor = tensor.name
    entry.base_dtype = tensor.dtype
    entry.base_norm = squares**0.5
    if squares and entry.update_norm is not None:
        entry.relative_update = entry.update_norm / entry.base_norm
    entry.changed_share = changed / elements if elements else 0.0
