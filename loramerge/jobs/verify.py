"""Proof that two adapters, or an adapter and a merged model, mean the same."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule
from loramerge.adapter_checks import read_checked, refuse_dense_updates
from loramerge.errors import FormatError, MismatchError, OptionError, UsageError, located, opt
from loramerge.formats.registry import ReadOptions
from loramerge.io.hub import resolve
from loramerge.jobs.defaults import VERIFY_ATOL, VERIFY_MAX_TOKENS, VERIFY_RTOL
from loramerge.jobs.options import check_tolerance, needs
from loramerge.model.fit import rename_to_base
from loramerge.model.folder import base_config_of, open_base, resolve_base
from loramerge.model.hf_runtime import load_model, quiet_transformers
from loramerge.model.lora_forward import PlainForward
from loramerge.model.names import resolve_tensor_name
from loramerge.model.stream_stats import Progress
from loramerge.ops.lowrank import difference_frobenius_norm, update_frobenius_norm


@dataclass(frozen=True)
class Difference:
    """One compared quantity: a module's update, DoRA magnitude, LoRA bias or a full tensor.

    `source_norm` is the Frobenius norm of the source's quantity and `diff_norm` that of the
    difference (candidate minus source); both in float64.
    """

    name: str
    source_norm: float
    diff_norm: float

    @property
    def relative(self) -> float:
        if self.source_norm > 0:
            return self.diff_norm / self.source_norm
        return 0.0 if self.diff_norm == 0 else math.inf

    def excess(self, atol: float, rtol: float) -> float:
        """diff / tolerance: above 1 fails."""
        allowed = atol + rtol * self.source_norm
        if allowed > 0:
            return self.diff_norm / allowed
        return 0.0 if self.diff_norm == 0 else math.inf


@dataclass
class VerifyResult:
    mode: str  # "factors" or "logits"
    atol: float
    rtol: float
    differences: list[Difference] = field(default_factory=list)
    logits: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> Difference | None:
        if not self.differences:
            return None
        return max(self.differences, key=lambda d: (d.excess(self.atol, self.rtol), d.relative))

    @property
    def passed(self) -> bool:
        worst = self.worst
        return worst is None or worst.excess(self.atol, self.rtol) <= 1.0

    def failure(self, source: str | Path, candidate: str | Path) -> MismatchError | None:
        """The error that says where the candidate differs most, or None when it passed."""
        worst = self.worst
        if self.passed or worst is None:
            return None
        allowed = self.atol + self.rtol * worst.source_norm
        return MismatchError(
            f"differs from {source}: {worst.name}: difference {worst.diff_norm:.3e} (relative "
            f"{worst.relative:.3e}) > tolerance {allowed:.3e} (atol {self.atol:g} + rtol "
            f"{self.rtol:g} x {worst.source_norm:.3e})",
            file=candidate,
        )

    def to_json(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "passed": self.passed,
            "mode": self.mode,
            "atol": self.atol,
            "rtol": self.rtol,
            "worst": None if worst is None else _row(worst),
            "compared": len(self.differences),
            "modules": [_row(d) for d in self.differences],
            "logits": self.logits,
            "notes": self.notes,
        }


def _row(diff: Difference) -> dict[str, Any]:
    return {
        "name": diff.name,
        "source_norm": diff.source_norm,
        "diff_norm": diff.diff_norm,
        "relative": diff.relative,
    }


def is_model_folder(path: Path) -> bool:
    """A Hugging Face model folder (config.json and weights, no adapter config)."""
    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and not (path / "adapter_config.json").exists()
        and any(path.glob("*.safetensors"))
    )


def read_side(
    path: Path, base_config: Mapping[str, Any] | None, base: str | Path | None = None
) -> Adapter:
    """Any adapter format loramerge reads (GGUF with the base config when it needs it; VeRA,
    MiSS and torchtune with the base), refused like every other command refuses it: empty, or
    NaN / Inf values."""
    adapter = read_checked(path, options=ReadOptions(base_config=base_config, base=base))
    refuse_dense_updates(
        adapter, "verify", "merge it (`loramerge merge`) and compare the merged model's logits"
    )
    return adapter


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
        return _compare_logits(source, candidate, base, Path(text), base_config, atol, rtol)
    if merged:
        assert base is not None
        return _compare_weights(source, candidate, base, base_config, atol, rtol, progress)
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


def _compare_weights(
    source: Path,
    candidate: Path,
    base: str | Path,
    base_config: Mapping[str, Any] | None,
    atol: float,
    rtol: float,
    progress: Progress | None,
) -> VerifyResult:
    from loramerge.jobs.verify_weights import compare_merged

    adapter_side, folder = (candidate, source) if is_model_folder(source) else (source, candidate)
    adapter = read_checked(adapter_side, options=ReadOptions(base_config=base_config, base=base))
    norms, notes = compare_merged(adapter, base, folder, progress)
    result = VerifyResult("weights", atol, rtol, notes=notes)
    for name, (update, excess) in norms.items():
        result.differences.append(Difference(name, update, excess))
    return result


def _compare_logits(
    source: Path,
    candidate: Path,
    base: str | Path,
    text: Path,
    base_config: Mapping[str, Any] | None,
    atol: float,
    rtol: float,
) -> VerifyResult:
    root = resolve_base(base)
    ids = _token_ids(root, text, base_config or {})
    with quiet_transformers():
        logits_a, loss_a = _run(source, root, ids, base_config)
        logits_b, loss_b = _run(candidate, root, ids, base_config)
    if logits_a.shape != logits_b.shape:
        raise OptionError(
            f"the two models give logits of shapes {list(logits_a.shape)} and "
            f"{list(logits_b.shape)}: different vocabularies"
        )
    diff = (logits_b - logits_a).abs()
    position = int(diff.amax(dim=-1).argmax())
    result = VerifyResult("logits", atol, rtol)
    top = float(logits_a.abs().max())
    # scale the tolerance by the largest logit: relative per element is meaningless near zero
    result.differences.append(Difference(f"logits at token {position}", top, float(diff.max())))
    result.logits = {
        "tokens": int(ids.shape[1]),
        "max_abs_diff": float(diff.max()),
        "max_abs_logit": top,
        "loss_source": loss_a,
        "loss_candidate": loss_b,
        "loss_diff": abs(loss_b - loss_a),
    }
    return result


def _token_ids(root: Path, text: Path, config: Mapping[str, Any]) -> torch.Tensor:
    """The text's first tokens (at most the model's context) by the base's tokenizer."""
    from transformers import AutoTokenizer

    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise FormatError(
            f"cannot be read as UTF-8 text ({reason or exc})", file=text, option="text"
        ) from None
    limit = min(
        VERIFY_MAX_TOKENS,
        int(config.get("max_position_embeddings") or config.get("n_positions") or 1e9),
    )
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(root)
        tokens = tokenizer(content, return_tensors="pt")["input_ids"]
    ids = tokens[:, :limit]
    if ids.shape[1] < 2:
        raise FormatError("holds fewer than two tokens", file=text, hint="pass a longer text")
    return ids


def _run(
    side: Path, root: Path, ids: torch.Tensor, base_config: Mapping[str, Any] | None
) -> tuple[torch.Tensor, float]:
    """Logits and loss of one side in float32: a merged folder as is, an adapter applied to
    the base by loramerge's own forward hooks (PEFT's forward, without PEFT)."""
    if is_model_folder(side):
        return _forward(load_model(side), ids)
    adapter = read_side(side, base_config, root)
    if adapter.source_format != "peft":
        adapter = rename_to_base(adapter, root)
    model = load_model(root)
    with PlainForward(model, adapter):
        return _forward(model, ids)


def _forward(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    model.eval()
    with torch.no_grad():
        output = model(input_ids=ids, labels=ids)
    return output.logits.float(), float(output.loss)
