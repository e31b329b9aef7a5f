"""A pure merge planner: from base headers and an adapter to per-tensor actions, shard by shard."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from loramerge.adapter import Adapter, LoraModule, ModuleKind
from loramerge.errors import FormatError, ShapeMismatchError
from loramerge.io.safetensors_header import FLOAT_CODES, TensorEntry, itemsize
from loramerge.model.names import (
    input_embedding_name,
    output_embedding_name,
    resolve_tensor_name,
)
from loramerge.model.shapes import (
    check_bias,
    check_full_copy,
    check_shape,
    square_kind,
    weight_kind,
)

DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
DTYPE_CODES = {name: code for code, name in DTYPE_NAMES.items()}


class Action(str, Enum):
    COPY = "copy"  # bytes unchanged
    CAST = "cast"  # same values in another dtype
    MERGE = "merge"  # base + LoRA update (DoRA rescaled), rounded once
    BIAS = "bias"  # base bias + s * LoRA bias
    REPLACE = "replace"  # a full tensor the adapter carries


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor. `source` is the base tensor read; `adapter_tensor` names a full tensor
    of the adapter (modules_to_save or saved base table) used instead of, or as, the base value."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    action: Action
    source: str | None = None
    module: str | None = None
    kind: ModuleKind | None = None
    adapter_tensor: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class ShardPlan:
    file_name: str
    tensors: tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class ModuleTarget:
    """Where one adapter module lands in the base."""

    module: str
    tensor: str
    kind: ModuleKind
    shape: tuple[int, ...]
    bias_tensor: str | None = None


@dataclass(frozen=True)
class MergePlan:
    shards: tuple[ShardPlan, ...]
    targets: tuple[ModuleTarget, ...]
    config_updates: Mapping[str, Any] = field(default_factory=dict)
    untied: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    def counts(self) -> dict[str, int]:
        counts = {action.value: 0 for action in Action}
        for shard in self.shards:
            for tensor in shard.tensors:
                counts[tensor.action.value] += 1
        return counts


def plan_merge(
    base_tensors: Sequence[tuple[str, TensorEntry]],
    config: Mapping[str, Any],
    adapter: Adapter,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    single_file_name: str = "model.safetensors",
) -> MergePlan:
    """Plan every output tensor. `dtype` is a safetensors code ("BF16") or None to keep each."""
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise FormatError(
            f"unsupported output dtype {dtype}", hint="use float32, float16 or bfloat16"
        )
    where = adapter.source_path
    entries = {entry.name: entry for _, entry in base_tensors}
    embed_name = input_embedding_name(entries)
    lm_head_name = output_embedding_name(entries)
    tied = (
        lm_head_name not in entries
        and embed_name is not None
        and bool(config.get("tie_word_embeddings", True))
    )
    shapes = {name: entry.shape for name, entry in entries.items()}
    if tied:
        shapes[lm_head_name] = entries[embed_name].shape

    def resolve(name: str, what: str, module: str | None = None) -> str:
        found = resolve_tensor_name(name, shapes)
        if found is None:
            raise FormatError(
                f"the base model has no tensor {name} for this {what}",
                path=where,
                module=module,
                hint="is this adapter for another base model?",
            )
        return found

    tables = {
        resolve(n, "saved base table"): key for n, key in ((k, k) for k in adapter.base_tables)
    }
    replacements = {resolve(k, "modules_to_save tensor"): k for k in adapter.modules_to_save}
    for found, carried in ((tables, adapter.base_tables), (replacements, adapter.modules_to_save)):
        for name, key in found.items():
            check_full_copy(name, shapes[name], tuple(carried[key].shape), where, key)

    targets: dict[str, ModuleTarget] = {}
    open_square: list[tuple[LoraModule, str, tuple[int, ...]]] = []
    votes: set[ModuleKind] = set()
    for module in adapter.modules.values():
        tensor = resolve(module.path + ".weight", "adapter module", module.path)
        if tensor in replacements:
            raise FormatError(
                "is both a LoRA module and in modules_to_save", path=where, module=module.path
            )
        shape = (
            tuple(adapter.base_tables[tables[tensor]].shape) if tensor in tables else shapes[tensor]
        )
        bias = None
        if module.bias is not None:
            bias = resolve(module.path + ".bias", "LoRA bias", module.path)
            check_bias(module, shapes[bias], where)
        if module.kind in (ModuleKind.LINEAR, ModuleKind.CONV1D):
            kind = weight_kind(module, shape, where or "")
            if kind is None:
                open_square.append((module, tensor, shape))
                continue
            votes.add(kind)
        else:
            kind = module.kind
            check_shape(module, shape, where or "")
        targets[module.path] = ModuleTarget(module.path, tensor, kind, shape, bias)
    square = square_kind(votes, config, [m for m, _, _ in open_square])
    for module, tensor, shape in open_square:
        bias = resolve(module.path + ".bias", "LoRA bias") if module.bias is not None else None
        if bias is not None:
            check_bias(module, shapes[bias], where)
        targets[module.path] = ModuleTarget(module.path, tensor, square, shape, bias)
    for target in targets.values():
        module = adapter.modules[target.module]
        if module.magnitude is not None and math.prod(module.magnitude.shape) != _out_features(
            target
        ):
            raise ShapeMismatchError(
                f"DoRA magnitude has {list(module.magnitude.shape)} entries, the layer has "
                f"{_out_features(target)} outputs",
                path=where,
                module=module.path,
            )

    by_tensor = {t.tensor: t for t in targets.values()}
    biases = {t.bias_tensor: t for t in targets.values() if t.bias_tensor}
    changed = set(by_tensor) | set(replacements) | set(tables)
    untie = tied and (embed_name in changed or lm_head_name in changed)

    def out_dtype(code: str, name: str) -> str:
        if dtype is None or code not in FLOAT_CODES:
            return code
        return dtype

    def plan_for(name: str, source: str) -> TensorPlan:
        base = entries[source]
        code = out_dtype(base.dtype, name)
        if name in replacements:
            key = replacements[name]
            full = adapter.modules_to_save[key]
            return TensorPlan(name, code, tuple(full.shape), Action.REPLACE, adapter_tensor=key)
        if name in by_tensor:
            target = by_tensor[name]
            if base.dtype not in FLOAT_CODES:
                raise FormatError(
                    f"base tensor {source} is stored as {base.dtype}; loramerge merges into "
                    "float16, bfloat16 or float32 weights",
                    path=where,
                    module=target.module,
                    hint="dequantize the base model first",
                )
            table = tables.get(name) or (tables.get(source) if source != name else None)
            return TensorPlan(
                name,
                code,
                target.shape,
                Action.MERGE,
                source=source,
                module=target.module,
                kind=target.kind,
                adapter_tensor=table,
            )
        if name in biases:
            return TensorPlan(
                name, code, base.shape, Action.BIAS, source=source, module=biases[name].module
            )
        table = tables.get(name) or (tables.get(source) if source != name else None)
        if table is not None:
            full = adapter.base_tables[table]
            return TensorPlan(name, code, tuple(full.shape), Action.REPLACE, adapter_tensor=table)
        action = Action.COPY if code == base.dtype else Action.CAST
        return TensorPlan(name, code, base.shape, action, source=source)

    shards: dict[str, list[TensorPlan]] = {}
    for shard, entry in base_tensors:
        shards.setdefault(shard, []).append(plan_for(entry.name, entry.name))
        if untie and entry.name == embed_name:
            shards[shard].append(plan_for(lm_head_name, embed_name))
    updates: dict[str, Any] = {}
    if dtype is not None:
        updates["torch_dtype"] = updates["dtype"] = DTYPE_NAMES[dtype]
    if untie:
        updates["tie_word_embeddings"] = False
    if embed_name is not None:
        vocab = next((t.shape[0] for s in shards.values() for t in s if t.name == embed_name), None)
        if vocab is not None and vocab != entries[embed_name].shape[0]:
            updates["vocab_size"] = vocab
    shard_plans = [ShardPlan(name, tuple(plans)) for name, plans in shards.items()]
    if max_shard_bytes is not None:
        shard_plans = reshard(
            [t for s in shard_plans for t in s.tensors], max_shard_bytes, single_file_name
        )
    ordered_targets = tuple(targets[path] for path in adapter.modules)
    return MergePlan(tuple(shard_plans), ordered_targets, updates, untie)


def _out_features(target: ModuleTarget) -> int:
    if target.kind in (ModuleKind.CONV1D, ModuleKind.EMBEDDING):
        return target.shape[1]
    return target.shape[0]


def reshard(tensors: list[TensorPlan], max_bytes: int, single_file_name: str) -> list[ShardPlan]:
    """Greedy shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [ShardPlan(single_file_name, tuple(groups[0]))]
    count = len(groups)
    return [
        ShardPlan(f"model-{i + 1:05d}-of-{count:05d}.safetensors", tuple(group))
        for i, group in enumerate(groups)
    ]
