"""The `reslora` options and the rule they pick: `ResLoraOptions` (every check that needs no
checkpoint), `choose_rule` (the row of loramerge.ops.reslora_table for a checkpoint type under
the options) and `estimator_text` (what produced the coefficients, as reported).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loramerge.errors import OptionError, UsageError, opt
from loramerge.jobs.options import check_choice, check_rank, exclusive
from loramerge.ops.reslora_table import EXACT_KINDS, MS_RULES, NORMS, Rule, find_rule, kinds_with


@dataclass(frozen=True)
class ResLoraOptions:
    """How to merge: `norms` None means "inputs" when `stats` is given, else "weights"."""

    norms: str | None = None
    stats: Path | None = None
    ms_rule: str = MS_RULES[0]
    rank: int | None = None
    uniform_rank: bool = False

    @property
    def norm_source(self) -> str:
        return self.norms or ("inputs" if self.stats else NORMS[0])

    def check(self) -> None:
        """Every check that needs no checkpoint: choices, ranges, options that fit together."""
        if self.norms is not None:
            check_choice(self.norms, NORMS, "norms")
        check_choice(self.ms_rule, MS_RULES, "ms_rule")
        exclusive("rank", self.rank is not None, "uniform_rank", self.uniform_rank)
        if self.rank is not None:
            check_rank(self.rank)
        norms = self.norm_source
        if norms == "inputs" and self.stats is None:
            raise UsageError(
                f"needs {opt('stats')}: a statistics file from loramerge reslora-stats",
                option="norms",
                value=norms,
            )
        if self.stats is not None and norms != "inputs":
            raise UsageError(
                f"gives input norms, and {opt('norms')} is {norms}",
                option="stats",
                hint="drop one of the two",
            )


def choose_rule(kind: str, options: ResLoraOptions) -> Rule:
    """The table's rule for a checkpoint type under these options; refuses options that do not
    apply to it."""
    if kind in EXACT_KINDS:
        given = [("norms", options.norms), ("stats", options.stats)]
        given.append(("ms_rule", options.ms_rule if options.ms_rule != MS_RULES[0] else None))
        for option, value in given:
            if value is not None:
                raise OptionError(
                    f"does not apply: {kind} blocks merge exactly", option=option, value=value
                )
    norms, ms_rule = options.norm_source, options.ms_rule
    if kind not in kinds_with(ms_rule=ms_rule) and ms_rule != MS_RULES[0]:
        only = ", ".join(kinds_with(ms_rule=ms_rule))
        raise OptionError(f"applies to {only} checkpoints only", option="ms_rule", value=ms_rule)
    if kind not in kinds_with(norms=norms) and kind not in EXACT_KINDS:
        only = ", ".join(kinds_with(norms=norms))
        raise OptionError(f"applies to {only} checkpoints only", option="norms", value=norms)
    rule = find_rule(kind, norms, ms_rule)
    if rule is None:
        raise OptionError(
            f"needs {opt('stats')}: a statistics file from loramerge reslora-stats",
            option="ms_rule",
            value=ms_rule,
        )
    return rule


def estimator_text(rule: Rule, options: ResLoraOptions, pad_to: int | None) -> str:
    text = rule.estimator
    if options.rank is not None:
        text += f", compressed to rank {options.rank} (QR-core SVD)"
    elif pad_to is not None:
        text += f", zero-padded to rank {pad_to}"
    return text
