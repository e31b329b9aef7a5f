"""The ResLoRA merge rules as a table (docs/rules.md section 4): which function of
loramerge.ops.reslora_rules merges which checkpoint type, under which norms and middle-shortcut
rule, and what it reads. The job picks a row; the command line's choices and the docs' table
come from RULES. Torch-free: the rule functions load on first use."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# What a rule reads besides the factors
WEIGHTS = "base weights"  # ||W||, B^T W per block (BaseProducts)
OFFICIAL_WEIGHTS = "base weights, W B too"  # the official-code norm also needs W B
INPUT_NORMS = "input norms"  # mean ||x_n|| per block, from a reslora-stats file
MIDDLE_NORMS = "middle-vector norms"  # mean ||A_n x_n|| per block, from a reslora-stats file


@dataclass(frozen=True)
class Rule:
    """One merge rule: for `kind` checkpoints under `norms` (None: the rule needs none) and
    `ms_rule` (None: not a middle-shortcut choice), `function`(chain, scale[, pre_num][, data])
    with `data` what `reads` names."""

    kind: str
    norms: str | None
    ms_rule: str | None
    function: str
    reads: str | None
    windowed: bool  # takes pre_num, the number of previous blocks a block reaches
    exact: bool  # equal to the trained forward for any input
    estimator: str  # how the report names where the coefficients came from

    def apply(
        self, chain: Sequence[Any], scale: float, pre_num: int, data: Any = None
    ) -> Iterator[Any]:
        """The chain's plain blocks, one by one in chain order."""
        rules = importlib.import_module("loramerge.ops.reslora_rules")
        args: list[Any] = [chain, scale]
        if self.windowed:
            args.append(pre_num)
        if self.reads is not None:
            args.append(data)
        return getattr(rules, self.function)(*args)


RULES: list[Rule] = [
    Rule("none", None, None, "merge_none", None, False, True, "exact"),
    Rule("bs", None, None, "merge_bs", None, True, True, "exact"),
    Rule("is", "weights", None, "merge_is_weights", WEIGHTS, False, False, "weight-based norms"),
    Rule(
        "is",
        "official",
        None,
        "merge_is_official",
        OFFICIAL_WEIGHTS,
        False,
        False,
        "official-code norms",
    ),
    Rule("is", "inputs", None, "merge_is_inputs", INPUT_NORMS, False, False, "input norms"),
    Rule(
        "ms",
        "weights",
        "amerge",
        "merge_ms_amerge_weights",
        WEIGHTS,
        True,
        False,
        "weight-based norms",
    ),
    Rule(
        "ms", "inputs", "amerge", "merge_ms_amerge_inputs", INPUT_NORMS, True, False, "input norms"
    ),
    Rule(
        "ms",
        "inputs",
        "scalar",
        "merge_ms_scalar",
        MIDDLE_NORMS,
        True,
        False,
        "scalar rule from middle-vector norms",
    ),
]


def _names(values: Sequence[str | None]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(value for value in values if value is not None))


NORMS = _names([rule.norms for rule in RULES])  # the first is the default without statistics
MS_RULES = _names([rule.ms_rule for rule in RULES])  # the first is the default
EXACT_KINDS = _names([rule.kind for rule in RULES if rule.exact])


def kinds_with(*, norms: str | None = None, ms_rule: str | None = None) -> tuple[str, ...]:
    """The checkpoint types that some rule serves under these norms or this ms rule."""
    found = [rule for rule in RULES if norms is None or rule.norms == norms]
    return _names([rule.kind for rule in found if ms_rule is None or rule.ms_rule == ms_rule])


def find_rule(kind: str, norms: str, ms_rule: str) -> Rule | None:
    """The rule for a checkpoint type under these norms and ms rule; None when there is none."""
    for rule in RULES:
        if rule.kind != kind:
            continue
        if rule.norms not in (None, norms) or rule.ms_rule not in (None, ms_rule):
            continue
        return rule
    return None
