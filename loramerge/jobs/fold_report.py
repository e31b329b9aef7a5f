"""What a COLA fold reports: each link's update size per module, the chain's sum, warnings about
links that do not fit together or whose rounding erased their update, and the fold's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramerge.errors import located, opt
from loramerge.formats.cola_chain import Chain
from loramerge.jobs.merge import MergeResult, rounding_warning
from loramerge.model.stream_stats import ERASED_SHARE
from loramerge.ops.cola_links import total_norm

if TYPE_CHECKING:
    from loramerge.ops.cola_fold import FoldedAdapter


@dataclass
class LinkModule:
    """One module of one link: its rank, effective scale (weight included) and update size."""

    rank: int
    scale: float
    norm: float  # ||w s B A||_F
    changed_share: float | None = None  # per-link rounding: share of elements the knot changed
    elements: int = 0


@dataclass
class LinkReport:
    index: int
    path: Path
    weight: float
    base_model: str | None
    modules: dict[str, LinkModule]

    @property
    def norm(self) -> float:
        return total_norm([m.norm for m in self.modules.values()])

    @property
    def changed_share(self) -> float | None:
        """Share of the link's updated elements that survived its own rounding (per-link)."""
        counted = [m for m in self.modules.values() if m.changed_share is not None]
        elements = sum(m.elements for m in counted)
        if not counted or not elements:
            return None
        return sum(m.changed_share * m.elements for m in counted) / elements

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path": str(self.path),
            "weight": self.weight,
            "base_model": self.base_model,
            "update_norm": self.norm,
            "changed_share": self.changed_share,
            "modules": {
                path: {
                    "rank": m.rank,
                    "scale": m.scale,
                    "update_norm": m.norm,
                    "changed_share": m.changed_share,
                }
                for path, m in self.modules.items()
            },
        }


@dataclass
class FoldResult:
    out: Path
    links: list[LinkReport]
    chain_norms: dict[str, float]  # ||sum_j w_j s_j B_j A_j||_F per module
    rounding: str | None = None  # None when an adapter was written
    merge: MergeResult | None = None  # the (last) merge of the folded model
    folded: FoldedAdapter | None = None  # the adapter written (as_lora)
    bytes_written: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # output tensors by action
    warnings: list[str] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)  # the engine profile's report
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "out": str(self.out),
            "kind": "adapter" if self.folded is not None else "model",
            "rounding": self.rounding,
            "seconds": round(self.seconds, 3),
            "links": [link.to_json() for link in self.links],
            "chain_update_norm": dict(self.chain_norms),
            "warnings": self.warnings,
        }
        if self.merge is not None:
            summary["bytes"] = self.bytes_written
            summary["shards"] = [s.file_name for s in self.merge.plan.shards]
            summary["tensors"] = self.counts
            if self.rounding == "once":
                summary["changed_share"] = {
                    name: stats.changed_share for name, stats in self.merge.modules.items()
                }
        if self.folded is not None:
            summary["energy_kept"] = self.folded.energy_kept
            summary["modules"] = {
                path: {
                    "rank": m.rank,
                    "link_ranks": list(m.link_ranks),
                    "energy_kept": m.energy_kept,
                    "relative_error": m.relative_error,
                }
                for path, m in self.folded.modules.items()
            }
        if self.engine:
            summary["engine"] = self.engine
        return summary


def base_model_warnings(chain: Chain) -> list[str]:
    named = [(link.index, link.adapter.base_model) for link in chain.links]
    distinct = sorted({name for _, name in named if name})
    if len(distinct) < 2:
        return []
    listed = ", ".join(f"link {index}: {name or 'none'}" for index, name in named)
    return [f"the links name different base models ({listed}); a COLA chain shares one base"]


def link_reports(chain: Chain) -> tuple[list[LinkReport], dict[str, float]]:
    """Per link and module the update size, and per module the size of the chain's sum."""
    # torch, which `fold` imports here, on the thread that measures while the base streams
    from loramerge.ops.cola_fold import chain_update_norm, update_norm

    reports = []
    for link in chain.links:
        modules = {}
        for path, module in link.adapter.modules.items():
            with located(link.path, path):
                norm = update_norm(module, link.weight)
            modules[path] = LinkModule(module.r, module.scale * link.weight, norm)
        reports.append(
            LinkReport(link.index, link.path, link.weight, link.adapter.base_model, modules)
        )
    paths = sorted({p for link in chain.links for p in link.adapter.modules})
    chain_norms = {
        path: chain_update_norm(
            [(c.adapter.modules[path], c.weight) for c in chain.links if path in c.adapter.modules]
        )
        for path in paths
    }
    return reports, chain_norms


def knot_warnings(reports: list[LinkReport], dtype: str | None) -> list[str]:
    """One warning per link whose knot erased most of the update in some modules."""
    warnings = []
    for report in reports:
        erased = [
            m.changed_share
            for m in report.modules.values()
            if m.changed_share is not None and m.elements and m.changed_share < ERASED_SHARE
        ]
        if erased:
            where = (
                f"link {report.index} ({len(erased)} of {len(report.modules)} modules, its knot)"
            )
            kept = f"{min(erased):.0%}-{max(erased):.0%}"
            remedy = f"the default {opt('rounding')} once (or {opt('dtype')} float32) keeps them"
            warnings.append(rounding_warning(where, kept, dtype, remedy))
    return warnings
