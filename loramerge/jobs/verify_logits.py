"""`verify` with a text: both sides run through transformers on the base (an adapter through
loramerge's own forward hooks, a merged folder as it is) and their logits compared."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loramerge.errors import FormatError, OptionError
from loramerge.jobs.defaults import VERIFY_MAX_TOKENS
from loramerge.jobs.verify_result import Difference, VerifyResult, is_model_folder, read_side
from loramerge.model.folder import resolve_base
from loramerge.model.hf_runtime import load_model, quiet_transformers
from loramerge.model.lora_forward import PlainForward
from loramerge.model.rename import rename_to_base


def compare_logits(
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
