"""Adapters for several models at once (a Stable Diffusion pipeline's UNet and text encoders):
how their modules are keyed, split into one adapter per model, and picked one at a time."""

from __future__ import annotations

from dataclasses import replace

from loramerge.adapter import Adapter, LoraModule
from loramerge.errors import OptionError, UsageError, opt
from loramerge.formats.sd_names import COMPONENT_ORDER

# Adapter.modules keys: the module path when all modules belong to one model (a merge looks
# modules up by path), `<component>.<path>` when they belong to several (SDXL's two text
# encoders have the same paths).


def keyed(modules: list[LoraModule]) -> dict[str, LoraModule]:
    """Modules keyed as an Adapter keys them (see above)."""
    if len(components_of_modules(modules)) > 1:
        return {f"{m.component}.{m.path}": m for m in modules}
    return {m.path: m for m in modules}


def components_of_modules(modules: list[LoraModule]) -> list[str | None]:
    found = {m.component for m in modules}
    return sorted(found, key=_order)


def components(adapter: Adapter) -> list[str | None]:
    """The models an adapter adapts, in pipeline order; [None] for a one-model adapter."""
    found = {m.component for m in adapter.modules.values()}
    found |= {u.component for u in adapter.dense_updates.values()}
    return sorted(found or {None}, key=_order)


def _order(component: str | None) -> tuple[int, str]:
    if component in COMPONENT_ORDER:
        return COMPONENT_ORDER.index(component), ""
    return len(COMPONENT_ORDER), component or ""


def split(adapter: Adapter) -> dict[str | None, Adapter]:
    """One adapter per component, keyed by module path, with the source's provenance."""
    return {
        component: replace(
            adapter,
            modules={m.path: m for m in adapter.modules.values() if m.component == component},
            dense_updates={
                u.path: u for u in adapter.dense_updates.values() if u.component == component
            },
        )
        for component in components(adapter)
    }


def select(adapter: Adapter, component: str | None) -> Adapter:
    """The adapter of one component (`None`: the only one there is), keyed by path."""
    parts = split(adapter)
    if component is None:
        if len(parts) == 1:
            return next(iter(parts.values()))
        raise OptionError(
            f"adapts {len(parts)} models ({describe(parts)}); this needs one at a time",
            file=adapter.source_path,
            hint=f"pick one with {opt('component')}",
        )
    if component not in parts:
        raise OptionError(
            f"has no modules for this component; it adapts {describe(parts)}",
            file=adapter.source_path,
            option="component",
            value=component,
            hint=f"pick one of those with {opt('component')}",
        )
    return parts[component]


def describe(parts: dict[str | None, Adapter]) -> str:
    return ", ".join(
        f"{name or 'one model'} ({len(part.modules) + len(part.dense_updates)} modules)"
        for name, part in parts.items()
    )


def for_component(adapter: Adapter, component: str | None) -> Adapter:
    """`--component`: the modules of one component of a multi-model adapter, or a one-model
    adapter declared to be that component's (a diffusers file names it for each module)."""
    if component is None:
        return adapter
    if component not in COMPONENT_ORDER:
        raise UsageError(
            f"is not a pipeline component; choose one of {', '.join(COMPONENT_ORDER)}",
            option="component",
            value=component,
        )
    if components(adapter) == [None]:
        return replace(
            adapter,
            modules={k: replace(m, component=component) for k, m in adapter.modules.items()},
            dense_updates={
                k: replace(u, component=component) for k, u in adapter.dense_updates.items()
            },
        )
    return select(adapter, component)
