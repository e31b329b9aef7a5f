"""The merge planner: from base headers and an adapter to per-tensor actions, shard by shard.

The adapter is first fitted to the base (loramerge.model.fit), then what it changes is collected
per in-memory parameter (loramerge.model.param_changes) and mapped onto the tensors stored in
the base's files (loramerge.model.stored_tensors): every stored tensor gets one action
(loramerge.model.tensor_planner), and the members of tied groups the files do not hold are added
after the tensor they copy.
"""

from __future__ import annotations

from typing import Any

from loramerge.adapter import Adapter
from loramerge.errors import FormatError
from loramerge.io.dtypes import DTYPES, OUTPUT_DTYPES
from loramerge.model.architecture import side_effects
from loramerge.model.dense_fit import with_dense_forms
from loramerge.model.fit import Fitted, fit_adapter
from loramerge.model.folder import BaseModel
from loramerge.model.param_changes import (
    apply_config_updates,
    collect_changes,
    remaining_ties,
    resolve_ties,
    untie_updates,
)
from loramerge.model.plan import (
    MergePlan,
    ShardPlan,
    reshard,
)
from loramerge.model.stored_tensors import StoredTensors
from loramerge.model.tensor_planner import TensorPlanner


def plan_merge(
    base: BaseModel,
    adapter: Adapter,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    single_file_name: str = "model.safetensors",
) -> MergePlan:
    """Plan every output tensor. `dtype` is a safetensors code ("BF16") or None to keep each."""
    if dtype is not None and dtype not in OUTPUT_DTYPES.values():
        raise FormatError(
            f"unsupported output dtype {dtype}",
            hint=f"choose one of {', '.join(OUTPUT_DTYPES)}",
        )
    refuse_unmergeable(adapter)
    fitted = with_dense_forms(fit_adapter(adapter, base))
    stored = StoredTensors(base, fitted)
    changes = collect_changes(fitted)
    resolve_ties(changes, fitted.tied)
    planner = TensorPlanner(stored, changes, fitted, dtype)
    shards = planner.shards(base)
    updates: dict[str, Any] = {}
    if dtype is not None:
        updates["torch_dtype"] = updates["dtype"] = DTYPES[dtype][0]
    notes = list(fitted.notes)
    if changes.untie:
        notes += _untie(base, fitted, updates)
    if planner.vocab is not None:
        updates["vocab_size"] = planner.vocab
    shard_plans = [ShardPlan(name, tuple(plans)) for name, plans in shards.items()]
    if max_shard_bytes is not None:
        shard_plans = reshard(
            [t for s in shard_plans for t in s.tensors], max_shard_bytes, single_file_name
        )
    return MergePlan(tuple(shard_plans), fitted.adapter, updates, changes.untie, tuple(notes))


def _untie(base: BaseModel, fitted: Fitted, updates: dict[str, Any]) -> list[str]:
    """Config updates so that transformers does not tie again what the merge wrote apart, where
    the config can say so without changing anything else; notes otherwise."""
    flag = untie_updates(base.config)
    architecture = fitted.architecture
    if architecture is None:
        updates.update(flag)
        return []
    effects = side_effects(dict(base.config), flag)
    if not effects:
        updates.update(flag)
    kept = remaining_ties(architecture, apply_config_updates(dict(base.config), updates))
    if not kept:
        return []
    why = (
        f"its config reads tie_word_embeddings as more than tying ({', '.join(sorted(effects))})"
        if effects
        else "tie_word_embeddings does not control all of its ties"
    )
    return [
        f"{architecture.model_class} keeps tying {', '.join(sorted(kept))} ({why}): every tied "
        "tensor is stored in the merged folder, and transformers loads tensors stored with "
        "different values apart"
    ]


def refuse_unmergeable(adapter: Adapter) -> None:
    if adapter.merge_refusal is not None:
        raise FormatError(
            f"cannot be merged: {adapter.merge_refusal}",
            file=adapter.source_path,
            hint="keep it as an adapter (loramerge convert keeps this setting)",
        )
    if adapter.base_init is not None:
        raise FormatError(
            f"was initialised with {adapter.base_init}, so its factors apply to a residual of the "
            "base that must be rebuilt first",
            file=adapter.source_path,
        )
