"""What a merge changes, parameter by parameter, in the model's in-memory names.

An adapter changes parameters in six ways: a module's low-rank update, a dense update (a rule
applied to the weight, and possibly to its bias), a full replacement (modules_to_save, biases
trained with bias="all"), a LoRA bias added to a bias, a saved embedding table that is the
base value an update applies to, and trained token rows written over the base's. Tied
parameters share one tensor in the files: a change that PEFT's forward applies to one side only
(an update on the embedding but not the head, a modules_to_save copy of one side) unties them,
and every member is then written on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loramerge.adapter import Adapter
from loramerge.errors import FormatError
from loramerge.model.architecture import Architecture
from loramerge.model.fit import Fitted, Target

Resolve = Callable[[str], "str | None"]


@dataclass
class ParamChange:
    """Everything the merge does to one parameter (in-memory name)."""

    update: Target | None = None  # a module's low-rank update
    replacement: str | None = None  # key of a full tensor the adapter carries
    replacement_source: str = "modules_to_save"  # or "saved_biases"
    lora_bias: str | None = None  # module whose scaled LoRA bias is added
    table: str | None = None  # key of a saved base table: the base value (tied group-wide)
    rows: str | None = None  # key of token rows written over the base value (group-wide)
    dense: Target | None = None  # a dense update's rule applied to this weight
    dense_bias: str | None = None  # the dense update whose bias rule changes this bias

    def own(self) -> tuple[Any, ...]:
        """The changes PEFT applies to this parameter's own module only."""
        return (self.update, self.replacement, self.lora_bias, self.dense, self.dense_bias)

    def touched(self) -> bool:
        return any(self.own()) or self.table is not None or self.rows is not None


@dataclass
class ChangeSet:
    changes: dict[str, ParamChange] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)  # target -> source, as the model ties
    untie: bool = False

    def of(self, param: str) -> ParamChange:
        return self.changes.setdefault(param, ParamChange())


def _param_for(
    name: str, resolve: Resolve, what: str, adapter: Adapter, module: str | None = None
) -> str:
    found = resolve(name)
    if found is not None:
        return found
    raise FormatError(
        f"the base model has no parameter {name} for this {what}",
        file=adapter.source_path,
        module=module or name,
        hint="is this adapter for another base model?",
    )


def collect_changes(fitted: Fitted) -> ChangeSet:
    """Every parameter the merge changes, and how, in the fitted adapter's parameter names (the
    model's in-memory names with an architecture, the files' names without one)."""
    parameters = fitted.param_name
    adapter = fitted.adapter
    result = ChangeSet()
    for target in fitted.targets.values():
        change = result.of(target.param)
        if change.update is not None:
            raise FormatError(
                f"modules {change.update.module} and {target.module} both update {target.param}",
                file=adapter.source_path,
                module=target.module,
            )
        change.update = target
        module = adapter.modules[target.module]
        if module.bias is not None:
            bias = target.param.rsplit(".", 1)[0] + ".bias"
            found = _param_for(bias, parameters, "LoRA bias", adapter, target.module)
            result.of(found).lora_bias = target.module
    _collect_dense(fitted, result)
    carried_tensors = (
        ("modules_to_save", adapter.modules_to_save),
        ("saved_biases", adapter.saved_biases),
    )
    for source, carried in carried_tensors:
        for key in carried:
            change = result.of(_param_for(key, parameters, f"{source} tensor", adapter))
            change.replacement, change.replacement_source = key, source
    for key in adapter.base_tables:
        result.of(_param_for(key, parameters, "saved base table", adapter)).table = key
    for module in adapter.token_rows:
        param = _param_for(module + ".weight", parameters, "trained token rows", adapter, module)
        result.of(param).rows = module
    for param, change in result.changes.items():
        if change.dense is not None and (change.update or change.replacement or change.rows):
            raise FormatError(
                f"changes {param} with a dense update and also otherwise",
                file=adapter.source_path,
                module=change.dense.module,
            )
        if change.update is not None and change.replacement is not None:
            raise FormatError(
                "is both a LoRA module and in modules_to_save",
                file=adapter.source_path,
                module=change.update.module,
            )
        if change.rows is not None and (change.update is not None or change.replacement):
            raise FormatError(
                f"trains token rows of {param} and also updates it otherwise",
                file=adapter.source_path,
                module=change.rows,
            )
    return result


def _collect_dense(fitted: Fitted, result: ChangeSet) -> None:
    """Each dense update's weight, and its bias where its rule changes one: a bias to add must
    exist in the base; a bias to scale (IA3) is scaled where there is one."""
    adapter = fitted.adapter
    for key, target in fitted.dense_targets.items():
        change = result.of(target.param)
        if change.update is not None or change.dense is not None:
            raise FormatError(
                f"two modules update {target.param}", file=adapter.source_path, module=key
            )
        change.dense = target
        how = adapter.dense_updates[key].bias
        if how is None:
            continue
        bias = target.param.rsplit(".", 1)[0] + ".bias"
        if how == "add":
            found = _param_for(bias, fitted.param_name, "bias difference", adapter, key)
        else:
            found = fitted.param_name(bias)
        if found is not None:
            result.of(found).dense_bias = key


def resolve_ties(changes: ChangeSet, tied: Mapping[str, str]) -> None:
    """Spread group-wide changes over tied groups and decide whether they must be untied."""
    changes.tied = dict(tied)
    groups: dict[str, set[str]] = {}
    for target, source in tied.items():
        groups.setdefault(source, {source}).add(target)
    for members in groups.values():
        present = [changes.changes.get(m) for m in members]
        tables = {c.table for c in present if c is not None and c.table is not None}
        rows = {c.rows for c in present if c is not None and c.rows is not None}
        if len(tables) > 1 or len(rows) > 1:
            raise FormatError("carries two different tables for parameters the model ties")
        table = next(iter(tables), None)
        row_key = next(iter(rows), None)
        if table is not None or row_key is not None:
            for member in members:
                change = changes.of(member)
                change.table, change.rows = table, row_key
        if any(m in changes.changes and any(changes.changes[m].own()) for m in members):
            changes.untie = True


def untie_updates(config: Mapping[str, Any]) -> dict[str, Any]:
    """Config updates that stop transformers from tying embeddings: `tie_word_embeddings`
    false wherever the config or a sub-config sets it (dotted keys for sub-configs)."""
    updates: dict[str, Any] = {"tie_word_embeddings": False}
    for key, value in config.items():
        if isinstance(value, dict) and "tie_word_embeddings" in value:
            updates[f"{key}.tie_word_embeddings"] = False
    return updates


def apply_config_updates(config: dict[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of config.json with `updates` applied (dotted keys reach into sub-configs)."""
    result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for key, value in updates.items():
        head, _, tail = key.partition(".")
        if tail and isinstance(result.get(head), dict):
            result[head][tail] = value
        else:
            result[key] = value
    return result


def remaining_ties(architecture: Architecture, config: dict[str, Any]) -> dict[str, str]:
    """The ties transformers still makes under the updated config (asked of the architecture
    built from it): transformers leaves a pair apart when the files store both tensors with
    different values, so the merge writes every member of every tied group."""
    from loramerge.model.architecture import architecture_of

    rebuilt = architecture_of(config)
    return dict(rebuilt.tied) if isinstance(rebuilt, Architecture) else {}
