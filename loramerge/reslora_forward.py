"""Running the training-time ResLoRA forward with transformers: calibration statistics for the
input-based estimators (`collect_stats`) and the merge-loss check (`check_text`).

Forward hooks on the target linears implement the forwards of rules.md section 4; transformers
is imported lazily, only here.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import Adapter
from loramerge.errors import FormatError, LoramergeError, OptionError, ShapeMismatchError
from loramerge.formats import reslora as reslora_format
from loramerge.formats.reslora import ResLoraCheckpoint
from loramerge.model.folder import open_base
from loramerge.reslora import STATS_FORMAT, STATS_VERSION, ResLoraConversion, check_against_base


def collect_stats(
    checkpoint_path: str | Path,
    base_ref: str | Path,
    text: str | Path,
    *,
    seq_len: int = 128,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Run the ResLoRA forward on calibration text; the statistics file's content."""
    checkpoint = reslora_format.read(checkpoint_path)
    base = open_base(base_ref)
    check_against_base(checkpoint, base)
    batches = text_batches(base.root, Path(text), seq_len, batch_size, max_batches)
    model = load_model(base.root)
    forward = ResLoraForward(model, checkpoint, record=True)
    with torch.no_grad(), forward:
        for batch in batches:
            model(input_ids=batch)
    blocks = {}
    for chain, n, block in checkpoint.blocks():
        total_in, total_mid, count = forward.records[block.path]
        blocks[block.path] = {
            "chain": chain.name,
            "index": n,
            "layer": block.layer,
            "input_norm": total_in / count,
            "middle_norm": total_mid / count,
            "batches": count,
        }
    return {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "checkpoint": str(checkpoint_path),
        "base": str(base_ref),
        "text": str(text),
        "type": checkpoint.kind,
        "res_flag": checkpoint.config.res_flag,
        "seq_len": int(batches[0].shape[1]),
        "batch_size": batch_size,
        "batches": len(batches),
        "sequences": sum(int(b.shape[0]) for b in batches),
        "tokens": sum(int(b.numel()) for b in batches),
        "blocks": blocks,
    }


def stats_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


@dataclass
class CheckResult:
    """ResLoRA forward vs the merged plain model on one text (losses are per-token means)."""

    plain: str
    tokens: int
    sequences: int
    loss_base: float
    loss_reslora: float
    loss_plain: float
    loss_difference: float  # plain - reslora
    max_logit_difference: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_text(
    conversion: ResLoraConversion,
    base_ref: str | Path,
    text: str | Path,
    *,
    merged: Path | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> CheckResult:
    """Loss and logits of the ResLoRA forward (residual paths kept) against the plain model.

    The plain model is the merged folder `merged` when given (what ships, rounding included),
    else the plain adapter applied to the float32 base (what PEFT computes).
    """
    base = open_base(base_ref)
    batches = text_batches(base.root, Path(text), seq_len, batch_size, max_batches)
    model = load_model(base.root)
    plain_model = load_model(merged) if merged is not None else None
    residual = ResLoraForward(model, conversion.checkpoint)
    plain_hooks = PlainForward(model, conversion.adapter)
    totals = {"base": 0.0, "reslora": 0.0, "plain": 0.0}
    tokens, worst = 0, 0.0
    with torch.no_grad():
        for batch in batches:
            base_logits = model(input_ids=batch).logits
            with residual:
                res_logits = model(input_ids=batch).logits
            if plain_model is not None:
                plain_logits = plain_model(input_ids=batch).logits
            else:
                with plain_hooks:
                    plain_logits = model(input_ids=batch).logits
            for key, logits in (("base", base_logits), ("reslora", res_logits)):
                totals[key] += _loss_sum(logits, batch)
            totals["plain"] += _loss_sum(plain_logits, batch)
            tokens += batch.shape[0] * (batch.shape[1] - 1)
            worst = max(worst, float((res_logits - plain_logits).abs().max()))
    losses = {key: value / tokens for key, value in totals.items()}
    return CheckResult(
        plain=f"merged folder {merged}" if merged is not None else "plain adapter on the base",
        tokens=tokens,
        sequences=sum(int(b.shape[0]) for b in batches),
        loss_base=losses["base"],
        loss_reslora=losses["reslora"],
        loss_plain=losses["plain"],
        loss_difference=losses["plain"] - losses["reslora"],
        max_logit_difference=worst,
    )


def _loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token cross entropy, in float64."""
    predicted = logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.float64)
    return float(
        torch.nn.functional.cross_entropy(predicted, ids[:, 1:].reshape(-1), reduction="sum")
    )


# ---------------------------------------------------------------- the forward, through hooks


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars or info/warning logs while loading; restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(folder: Path):
    """The model as a float32 transformers causal LM, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, local_files_only=True
            )
    except (OSError, ValueError, KeyError) as exc:
        raise FormatError(
            f"transformers cannot load it as a causal language model ({exc})", path=folder
        ) from None
    return model.eval()


def text_batches(
    folder: Path, text: Path, seq_len: int, batch_size: int, max_batches: int | None
) -> list[torch.Tensor]:
    """The text tokenised by the base's tokenizer, cut into sequences of seq_len, batched."""
    from transformers import AutoTokenizer

    if seq_len < 2 or batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise OptionError("--seq-len must be >= 2, --batch-size and --max-batches >= 1")
    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot be read as UTF-8 text ({exc})", path=text) from None
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FormatError(
            f"has no tokenizer transformers can load ({exc})",
            path=folder,
            hint="the text needs the base's tokenizer files",
        ) from None
    with quiet_transformers():  # the whole text is longer than one sequence: no warning
        ids = tokenizer(content)["input_ids"]
    if len(ids) < 2:
        raise FormatError("holds fewer than 2 tokens", path=text)
    length = min(seq_len, len(ids))
    count = len(ids) // length
    chunks = torch.tensor(ids[: count * length], dtype=torch.long).view(count, length)
    batches = list(chunks.split(batch_size))
    return batches[:max_batches] if max_batches is not None else batches


class _Hooks(ABC):
    """Forward hooks registered on entry and removed on exit; reusable."""

    def __init__(self, model) -> None:
        self.model = model
        self._handles: list = []

    def _module(self, path: str):
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise ShapeMismatchError(
                "the transformers model has no such module", module=path
            ) from None

    @abstractmethod
    def _register(self) -> None:
        """Register this object's hooks, appending their handles to self._handles."""

    def __enter__(self):
        self._register()
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class PlainForward(_Hooks):
    """h += s B A x on every module of a plain adapter (PEFT's forward, without PEFT)."""

    def __init__(self, model, adapter: Adapter) -> None:
        super().__init__(model)
        self.adapter = adapter

    def _register(self) -> None:
        for module in self.adapter.modules.values():
            B, A = module.factors()
            scale = module.scale

            def hook(_layer, args, output, B=B, A=A, scale=scale):
                return output + ((args[0] @ A.T) @ B.T) * scale

            self._handles.append(self._module(module.path).register_forward_hook(hook))


class ResLoraForward(_Hooks):
    """The training-time forwards of rules.md section 4 as hooks on the target linears.

    is: h_n += s B_n A_n (x_n + x_{n-1}) (x_{-1} := x_0); bs: h_n += s (sum_k B_{n-k} A_{n-k}) x_n;
    ms: h_n += s B_n (sum_k A_{n-k} x_{n-k}). Chains run in layer order within one model
    forward, so block n reads what block n-1 left in the same forward. With `record`, each
    block's input Frobenius norm and middle-vector norm ||A_n x_n||_F are summed per forward.
    """

    def __init__(self, model, checkpoint: ResLoraCheckpoint, record: bool = False) -> None:
        super().__init__(model)
        self.checkpoint = checkpoint
        self.record = record
        self.records: dict[str, list[float]] = {}
        self._seen: dict[tuple[int, int], torch.Tensor] = {}

    def _register(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._reset))
        for c, chain in enumerate(self.checkpoint.chains):
            factors = [block.factors(torch.float32) for block in chain.blocks]
            for n, block in enumerate(chain.blocks):
                hook = self._hook(c, n, block.path, factors)
                self._handles.append(self._module(block.path).register_forward_hook(hook))

    def _reset(self, *_: object) -> None:
        self._seen = {}

    def _previous(self, c: int, j: int, n: int) -> torch.Tensor:
        """What block j of chain c left in this forward, for its successor n."""
        try:
            return self._seen[(c, j)]
        except KeyError:
            blocks = self.checkpoint.chains[c].blocks
            raise LoramergeError(
                f"block {blocks[n].path} ran before its previous block {blocks[j].path} in one "
                "forward pass",
                hint="this model runs its layers in another order than the checkpoint's chains",
            ) from None

    def _hook(self, c: int, n: int, path: str, factors: list):
        config = self.checkpoint.config
        kind, scale, m = self.checkpoint.kind, config.scale, config.window(n)
        B, A = factors[n]

        def hook(_layer, args, output):
            x = args[0]
            middle = x @ A.T
            if self.record:
                entry = self.records.setdefault(path, [0.0, 0.0, 0])
                entry[0] += float(torch.linalg.vector_norm(x.to(torch.float64)))
                entry[1] += float(torch.linalg.vector_norm(middle.to(torch.float64)))
                entry[2] += 1
            if kind == "is":
                self._seen[(c, n)] = x
                previous = x if n == 0 else self._previous(c, n - 1, n)
                term = (middle + previous @ A.T) @ B.T
            elif kind == "bs":
                term = middle @ B.T
                for k in range(1, m + 1):
                    Bk, Ak = factors[n - k]
                    term = term + (x @ Ak.T) @ Bk.T
            elif kind == "ms":
                self._seen[(c, n)] = middle
                total = middle
                for k in range(1, m + 1):
                    total = total + self._previous(c, n - k, n)
                term = total @ B.T
            else:
                term = middle @ B.T
            return output + term * scale

        return hook
