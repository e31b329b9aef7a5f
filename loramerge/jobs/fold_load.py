"""Reading a COLA chain to fold: every link read and checked (plain LoRA only), and with a base,
planned against it with names pinned to the base."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from loramerge.adapter import Adapter
from loramerge.adapter_checks import check_adapter, check_measurable
from loramerge.errors import FormatError, LoramergeError
from loramerge.formats.cola_chain import Chain, ChainLink, in_link, read_chain
from loramerge.formats.registry import ReadOptions
from loramerge.jobs.fold_report import base_model_warnings
from loramerge.model.folder import BaseModel, open_base
from loramerge.model.names import resolve_tensor_name
from loramerge.model.planner import plan_merge
from loramerge.model.rename import rename_to_base
from loramerge.ops.cola_links import check_compatible


def load_chain(
    paths: Sequence[str | Path],
    base_ref: str | Path | None = None,
    *,
    fmt: str | None = None,
    options: ReadOptions | None = None,
    allow_nonfinite: bool = False,
) -> tuple[Chain, list[str]]:
    """Read and check every link; with a base, plan each against it (names pinned to the base).

    Returns the chain and warnings (links naming different base models).
    """
    chain = read_chain(paths, fmt=fmt, options=options)
    base = open_base(base_ref) if base_ref is not None else None
    for link in chain.links:
        try:
            link.adapter = _checked(link, base, allow_nonfinite)
        except LoramergeError as exc:
            raise in_link(exc, link.index) from exc
    # without a base this is the only shape check; with one it cannot fail after the plans
    check_compatible([(link.adapter, link.weight) for link in chain.links])
    return chain, base_model_warnings(chain)


def _checked(link: ChainLink, base: BaseModel | None, allow_nonfinite: bool) -> Adapter:
    adapter = link.adapter
    check_adapter(adapter, allow_nonfinite)
    if allow_nonfinite:
        # every fold measures its links (the report's norms), which NaN and Inf have none of:
        # refused here, before anything is written, as check_adapter refuses them otherwise
        check_measurable(adapter, link.path)
    dora = [m.path for m in adapter.modules.values() if m.magnitude is not None]
    if dora:
        raise FormatError(
            "is a DoRA adapter; DoRA updates do not add up, so a chain of them cannot be folded",
            file=adapter.source_path,
            module=dora[0],
            hint="merge DoRA links one at a time with loramerge merge",
        )
    if adapter.modules_to_save:
        name = next(iter(adapter.modules_to_save))
        raise FormatError(
            f"carries a full trained tensor ({name}, modules_to_save); only plain LoRA links "
            "can be folded",
            file=adapter.source_path,
            hint="merge this link with loramerge merge instead",
        )
    if not adapter.modules:
        raise FormatError("holds no LoRA modules", file=adapter.source_path)
    if base is None:
        # saved base tables are the weights the link was trained on (earlier knots included);
        # the fold starts from the base instead
        return replace(adapter, base_tables={})
    adapter = rename_to_base(adapter, base.root)
    shapes = {entry.name: entry.shape for _, entry in base.tensors()}
    for name, table in adapter.base_tables.items():
        found = resolve_tensor_name(name, shapes)
        if found is not None and tuple(table.shape) != tuple(shapes[found]):
            raise FormatError(
                f"saved base table {name} is {list(table.shape)}, the base has "
                f"{list(shapes[found])}: tokens were added while training this link",
                file=adapter.source_path,
                hint="a chain whose vocabulary grows cannot be folded; merge link by link",
            )
    adapter = replace(adapter, base_tables={})
    # the merge planner's own checks: every module's shape against its base tensor
    plan_merge(base, adapter)
    return adapter
