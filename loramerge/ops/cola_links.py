"""The parts of COLA folding (docs/rules.md section 5) that need no torch: which links touch a
module and whether they fit together, weighting a link, and the exact fold of plain linear links
computed with numpy, so that `fold` streams the base while torch is still being imported for
its report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy

from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind
from loramerge.errors import ShapeMismatchError
from loramerge.ops.stored_factors import computed, float32_matrix, readable

Link = tuple[Adapter, float]  # an adapter and its weight in the chain
Members = list[tuple[int, LoraModule, float]]  # (link index, module, weight) on one module


def weighted(adapter: Adapter, weight: float) -> Adapter:
    """The adapter with every scale multiplied by `weight` (through alpha); itself for 1.0."""
    if weight == 1.0:
        return adapter
    modules = {p: replace(m, alpha=m.alpha * weight) for p, m in adapter.modules.items()}
    return replace(adapter, modules=modules)


def total_norm(norms: Sequence[float]) -> float:
    """The Frobenius norm of several modules' updates taken together."""
    return math.sqrt(sum(n * n for n in norms))


def chain_paths(links: Sequence[Link]) -> list[str]:
    """Every module some link updates, sorted."""
    return sorted({path for adapter, _ in links for path in adapter.modules})


def members(links: Sequence[Link], path: str) -> Members:
    """(link index, module, weight) of every link touching `path`, checked against each other."""
    found = [(i, a.modules[path], w) for i, (a, w) in enumerate(links, 1) if path in a.modules]
    first_index, first, _ = found[0]
    for index, module, _ in found[1:]:
        same_kind = module.kind is first.kind
        if (
            not same_kind
            or module.lora_B.shape[0] != first.lora_B.shape[0]
            or (module.lora_A.shape[1:] != first.lora_A.shape[1:])
        ):
            raise ShapeMismatchError(
                f"link {index}: its {module.kind.value} update "
                f"(B {list(module.lora_B.shape)}, A {list(module.lora_A.shape)}) does not fit "
                f"link {first_index}'s {first.kind.value} update on the same module "
                f"(B {list(first.lora_B.shape)}, A {list(first.lora_A.shape)})",
                file=links[index - 1][0].source_path,
                module=path,
                hint="every link of a chain must be trained on the same base model",
            )
    return found


def check_compatible(links: Sequence[Link]) -> None:
    """Refuse links whose updates on the same module have different kinds or shapes."""
    for path in chain_paths(links):
        members(links, path)


def folded_adapter(links: Sequence[Link], modules: dict[str, LoraModule]) -> Adapter:
    """The adapter of a folded chain: its modules, the first link's base model and task."""
    first = links[0][0]
    return Adapter(
        modules=modules,
        base_model=first.base_model,
        source_format="cola-chain",
        source_path=None,
        task_type=first.task_type,
    )


def folded_module(
    module: LoraModule,
    found: Members,
    bias: LazyTensor | None = None,
) -> LoraModule:
    """The folded module from the first link's `module` given its new factors and alpha: no
    rsLoRA, DoRA or bias of the links' own, `bias` instead, Conv1D layout if any link has it."""
    return replace(
        module,
        use_rslora=False,
        magnitude=None,
        bias=bias,
        fan_in_fan_out=any(m.fan_in_fan_out for _, m, _ in found),
    )


def concatenated(links: Sequence[Link]) -> Adapter | None:
    """`fold_chain(links).adapter` (the exact fold) with numpy, bit for bit, where every module
    of every link is a plain linear update (no bias, one expert) whose factors are stored as
    they are in a file as float32, bfloat16 or float16; None otherwise.

    As there: B' = [B_1, ..., B_T] and A' = [s_1 w_1 A_1; ...] with each product formed in
    float64 from the float32 factors and rounded once to float32.
    """
    if not links:
        return None
    modules: dict[str, LoraModule] = {}
    for path in chain_paths(links):
        found = members(links, path)
        if not all(_plain_linear(module) for _, module, _ in found):
            return None
        first = found[0][1]
        rank = sum(m.lora_A.shape[0] for _, m, _ in found)
        factors = {
            "lora_B": computed((first.lora_B.shape[0], rank), "F32", _joined_b(found)),
            "lora_A": computed((rank, first.lora_A.shape[1]), "F32", _joined_a(found)),
        }
        modules[path] = folded_module(replace(first, **factors, alpha=float(rank)), found)
    return folded_adapter(links, modules)


def _joined_b(found: Members) -> Callable[[], numpy.ndarray]:
    """B' = [B_1, ..., B_T], formed when read."""
    return lambda: numpy.concatenate([float32_matrix(m.lora_B) for _, m, _ in found], axis=1)


def _joined_a(found: Members) -> Callable[[], numpy.ndarray]:
    """A' = [s_1 w_1 A_1; ...], formed when read."""
    return lambda: numpy.concatenate([_scaled(m.lora_A, m.scale * w) for _, m, w in found])


def _plain_linear(module: LoraModule) -> bool:
    return (
        module.kind is ModuleKind.LINEAR
        and module.experts == 1
        and module.bias is None
        and module.magnitude is None
        and all(readable(f) and len(f.shape) == 2 for f in (module.lora_A, module.lora_B))
        and math.isfinite(module.scale)
    )


def _scaled(lora_a: LazyTensor, scale: float) -> numpy.ndarray:
    """s * A formed in float64 from the float32 factor, rounded once to float32."""
    return (float32_matrix(lora_a).astype(numpy.float64) * scale).astype(numpy.float32)
