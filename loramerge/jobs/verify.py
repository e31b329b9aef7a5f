"""Proof that two adapters, or an adapter and a merged model, mean the same."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule
from loramerge.errors import UsageError, located, opt
from loramerge.io.hub import resolve
from loramerge.jobs.defaults import VERIFY_ATOL, VERIFY_RTOL
from loramerge.jobs.options import check_tolerance, needs
from loramerge.jobs.verify_logits import compare_logits
from loramerge.jobs.verify_result import Difference, VerifyResult, is_model_folder, read_side
from loramerge.jobs.verify_weights import compare_weights
from loramerge.model.folder import base_config_of, open_base
from loramerge.model.names import resolve_tensor_name
from loramerge.model.rename import rename_to_base
from loramerge.model.stream_stats import Progress
from loramerge.ops.lowrank import difference_frobenius_norm, update_frobenius_norm


def verify(
    source: str | Path,
    candidate: str | Path,
    *,
    base: str | Path | None = None,
    text: str | Path | None = None,
    atol: float = VERIFY_ATOL,
    rtol: float = VERIFY_RTOL,
    progress: Progress | None = None,
) -> VerifyResult:
    """Compare `candidate` with `source` (each a local path or a cached hub repo id).

    Without `text`: per module, ||dW_candidate - dW_source||_F from the factors (QR core; no
    out x in matrix), passing when it is <= atol + rtol * ||dW_source||_F for every module;
    with `base`, a saved table on one side only is compared with the base's own. With `base`
    and `text`: both run through transformers on the base (adapters through loramerge's own
    forward hooks, a merged folder as is) and pass when max |logits difference| <= atol +
    rtol * max |logits|. With `base`, no `text` and a merged folder on one side: weight by weight
    against what merging the other side into `base` writes, streamed (jobs.verify_weights;
    `progress` is called with bytes compared).
    """
    check_tolerance(atol, "atol")
    check_tolerance(rtol, "rtol")
    needs("text", text is not None, "base", base is not None, "the text runs through the base")
    source = resolve(source, what="adapter or model folder")
    candidate = resolve(candidate, what="adapter or model folder")
    merged = [p for p in (source, candidate) if is_model_folder(p)]
    if len(merged) == 2 and text is None:
        raise UsageError(
            f"{source} and {candidate} are both merged models: comparing them needs "
            f"{opt('base')} and {opt('text')}",
            option="text",
        )
    if merged and text is None and base is None:
        raise UsageError(
            f"{merged[0]} is a merged model: comparing it weight by weight needs the base it was "
            f"merged into ({opt('base')}), or {opt('base')} and {opt('text')} for logits",
            option="base",
        )
    base_config = base_config_of(base) if base is not None else None
    if text is not None:
        assert base is not None
        return compare_logits(source, candidate, base, Path(text), base_config, atol, rtol)
    if merged:
        assert base is not None
        return compare_weights(source, candidate, base, base_config, atol, rtol, progress)
    left, right = read_side(source, base_config, base), read_side(candidate, base_config, base)
    base_tensor = None
    if base is not None:
        left, right = rename_to_base(left, base), rename_to_base(right, base)
        base_tensor = open_base(base).read_tensor
    result = VerifyResult("factors", atol, rtol)
    compare_adapters(left, right, result, base_tensor)
    return result


def compare_adapters(
    source: Adapter,
    candidate: Adapter,
    result: VerifyResult,
    base_tensor: Callable[[str], torch.Tensor | None] | None = None,
) -> None:
    """Every module, magnitude, bias and saved tensor of either side, matched by name.

    A saved base table on one side only stands for the base's own tensor on the other, which
    `base_tensor` reads (without a base it is not compared, and a note says so)."""
    pairs = _match(source.modules, candidate.modules)
    for name, left, right in pairs:
        result.differences.append(_update_difference(name, left, right))
        for part in ("magnitude", "bias"):
            a = _extra(left, part)
            b = _extra(right, part)
            if a is not None or b is not None:
                a = a if a is not None else torch.zeros_like(b)
                b = b if b is not None else torch.zeros_like(a)
                result.differences.append(_tensor_difference(f"{name} ({part})", a, b))
    saved = _match(source.modules_to_save, candidate.modules_to_save)
    for name, left, right in saved:
        a = left.load().double() if left is not None else None
        b = right.load().double() if right is not None else None
        a = a if a is not None else torch.zeros_like(b)
        b = b if b is not None else torch.zeros_like(a)
        result.differences.append(_tensor_difference(f"{name} (modules_to_save)", a, b))
    for name, left, right in _match(source.base_tables, candidate.base_tables):
        a = left.load().double() if left is not None else None
        b = right.load().double() if right is not None else None
        if a is None or b is None:
            found = base_tensor(name) if base_tensor is not None else None
            if found is None:
                side = "source" if b is None else "candidate"
                result.notes.append(
                    f"saved table {name} only in the {side}: not compared (it matters only "
                    f"where it differs from the base's; pass {opt('base')} to compare it)"
                )
                continue
            a = a if a is not None else found.double()
            b = b if b is not None else found.double()
        result.differences.append(_tensor_difference(f"{name} (base table)", a, b))


def _match(left: Mapping[str, Any], right: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, left or None, right or None): exact names, else the loose match a merge uses."""
    right_names = {name + ".weight": name for name in right}
    pairs, used = [], set()
    for name, value in left.items():
        found = resolve_tensor_name(name + ".weight", right_names)
        other = right_names[found] if found is not None else None
        if other is not None and other not in used:
            used.add(other)
            pairs.append((name, value, right[other]))
        else:
            pairs.append((name, value, None))
    pairs += [(name, None, value) for name, value in right.items() if name not in used]
    return pairs


def _update_difference(name: str, left: LoraModule | None, right: LoraModule | None) -> Difference:
    with located(module=name):
        return _located_difference(name, left, right)


def _located_difference(name: str, left: LoraModule | None, right: LoraModule | None) -> Difference:
    """Over every expert of a stack (target_parameters), the root of the summed squares."""
    sides = [m for m in (left, right) if m is not None]
    counts = {m.experts for m in sides}
    if len(counts) > 1:
        source = left if left is not None else right
        return Difference(name, _pair_norms(source, None, None)[0], math.inf)
    experts = range(counts.pop()) if counts and max(m.experts for m in sides) > 1 else [None]
    source_sq = diff_sq = 0.0
    for expert in experts:
        source_norm, diff_norm = _pair_norms(left, right, expert)
        source_sq += source_norm**2
        diff_sq += diff_norm**2
    return Difference(name, math.sqrt(source_sq), math.sqrt(diff_sq))


def _pair_norms(
    left: LoraModule | None, right: LoraModule | None, expert: int | None
) -> tuple[float, float]:
    """(||source update||, ||candidate - source||) of one update (one expert's)."""
    if left is None or right is None:
        only = left or right
        assert only is not None
        b, a = only.factors(expert=expert)
        norm = update_frobenius_norm(b, a, only.scale)
        return (norm if left is not None else 0.0), norm
    b1, a1 = left.factors(expert=expert)
    b2, a2 = right.factors(expert=expert)
    norm = update_frobenius_norm(b1, a1, left.scale)
    if b1.shape[0] != b2.shape[0] or a1.shape[1] != a2.shape[1]:
        return norm, math.inf
    if left.scale == right.scale and torch.equal(b1, b2) and torch.equal(a1, a2):
        return norm, 0.0  # the QR route would give round-off, not zero
    return norm, difference_frobenius_norm(b1, a1, left.scale, b2, a2, right.scale)


def _extra(module: LoraModule | None, part: str) -> torch.Tensor | None:
    if module is None:
        return None
    tensor: LazyTensor | None = getattr(module, part)
    if tensor is None:
        return None
    # a LoRA bias adds scale * bias; DoRA magnitudes are absolute
    factor = module.scale if part == "bias" else 1.0
    return tensor.load().double() * factor


def _tensor_difference(name: str, left: torch.Tensor, right: torch.Tensor) -> Difference:
    if left.shape != right.shape:
        return Difference(name, float(torch.linalg.vector_norm(left)), math.inf)
    return Difference(
        name, float(torch.linalg.vector_norm(left)), float(torch.linalg.vector_norm(right - left))
    )


# --- logits through transformers --------------------------------------------------------------
