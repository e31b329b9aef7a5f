"""ResLoRA end to end: checkpoint + base -> plain LoRA, and the residual forward that measures it.

`convert_reslora` reads an official checkpoint, checks it against the base, applies the merge
rules of rules.md section 4 chain by chain (loramerge.ops.reslora) and returns a plain `Adapter`
with module paths as in the base, ready for `write_adapter` or `merge_adapter`. The second half
runs the training-time ResLoRA forward with transformers (imported lazily) through forward hooks:
`collect_stats` records the calibration norms that the input-based estimators read, and
`check_text` compares the ResLoRA forward with the merged plain model on a text.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule
from loramerge.errors import FormatError, LoramergeError, OptionError, ShapeMismatchError
from loramerge.formats import reslora as reslora_format
from loramerge.formats.common import read_json
from loramerge.formats.reslora import ResLoraCheckpoint
from loramerge.model.folder import BaseModel, open_base
from loramerge.ops import reslora as rules
from loramerge.safetensors_io import SafetensorsReader, TensorEntry

NORMS = ("weights", "official", "inputs")
MS_RULES = ("amerge", "scalar")
STATS_FORMAT = "loramerge-reslora-stats"
STATS_VERSION = 1
TILE_BYTES = 32 << 20  # float64 bytes of base rows read at a time for the norms


@dataclass(frozen=True)
class ResLoraOptions:
    """How to merge: `norms` None means "inputs" when `stats` is given, else "weights"."""

    norms: str | None = None
    stats: Path | None = None
    ms_rule: str = "amerge"
    rank: int | None = None
    uniform_rank: bool = False


@dataclass
class BlockReport:
    """One block's merge, as the CLI prints it."""

    module: str
    chain: str
    index: int
    layer: int | None
    rule: str
    rank: int
    alpha: float
    exact: bool
    coefficients: dict[str, float]
    norms: dict[str, float]
    stacked: list[int]
    energy_kept: float
    relative_error: float


@dataclass
class ResLoraConversion:
    checkpoint: ResLoraCheckpoint
    adapter: Adapter
    blocks: list[BlockReport]
    estimator: str  # what produced the coefficients, e.g. "weight-based norms"


def resolve_estimator(kind: str, options: ResLoraOptions) -> str:
    """The norm source a checkpoint type uses under these options; refuses contradictions."""
    if options.norms is not None and options.norms not in NORMS:
        raise OptionError(f"unknown --norms {options.norms!r}; choose one of {', '.join(NORMS)}")
    if options.ms_rule not in MS_RULES:
        raise OptionError(f"unknown --ms-rule {options.ms_rule!r}; choose amerge or scalar")
    if options.rank is not None and options.uniform_rank:
        raise OptionError("--rank and --uniform-rank exclude each other", hint="pick one")
    if options.rank is not None and options.rank < 1:
        raise OptionError(f"--rank must be at least 1, got {options.rank}")
    norms = options.norms or ("inputs" if options.stats else "weights")
    if norms == "inputs" and options.stats is None:
        raise OptionError("--norms inputs needs --stats FILE", hint="make one with reslora-stats")
    if options.stats is not None and norms != "inputs":
        raise OptionError(
            f"--stats gives input norms but --norms is {norms}", hint="drop one of the two"
        )
    if kind in ("bs", "none"):
        given = [
            name
            for name, value in (("--norms", options.norms), ("--stats", options.stats))
            if value
        ]
        if options.ms_rule != "amerge":
            given.append("--ms-rule")
        if given:
            raise OptionError(f"{given[0]} does not apply: {kind} blocks merge exactly")
        return "exact"
    if norms == "official" and kind != "is":
        raise OptionError("--norms official applies to input-shortcut (is) checkpoints only")
    if kind == "ms" and options.ms_rule == "scalar":
        if options.stats is None:
            raise OptionError("--ms-rule scalar needs --stats FILE (middle-vector norms)")
        return "scalar rule from middle-vector norms"
    if kind != "ms" and options.ms_rule != "amerge":
        raise OptionError("--ms-rule applies to middle-shortcut (ms) checkpoints only")
    return {
        "weights": "weight-based norms",
        "official": "official-code norms",
        "inputs": "input norms",
    }[norms]


def convert_reslora(
    checkpoint_path: str | Path, base_ref: str | Path, options: ResLoraOptions | None = None
) -> ResLoraConversion:
    """The plain LoRA that a ResLoRA checkpoint merges into on its base."""
    options = options or ResLoraOptions()
    checkpoint = reslora_format.read(checkpoint_path)
    estimator = resolve_estimator(checkpoint.kind, options)
    base = open_base(base_ref)
    check_against_base(checkpoint, base)
    norms = options.norms or ("inputs" if options.stats else "weights")
    if norms == "official" and checkpoint.kind == "is":
        for _, _, block in checkpoint.blocks():
            if block.shape[0] != block.shape[1]:
                raise OptionError(
                    f"--norms official adds (B A)^T to W, defined only for square weights; this "
                    f"one is {block.shape[0]} x {block.shape[1]}",
                    module=block.path,
                    hint="use the default weight-based norms",
                )
    stats = read_stats(options.stats, checkpoint) if options.stats else None
    config = checkpoint.config
    merged: list[tuple[str, int, Any, rules.PlainBlock]] = []
    located = base.locate()
    with ExitStack() as stack:
        readers: dict[str, SafetensorsReader] = {}
        for chain in checkpoint.chains:
            factors = [block.factors(torch.float64) for block in chain.blocks]
            for (B, A), block in zip(factors, chain.blocks, strict=True):
                if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
                    raise FormatError(
                        "holds NaN or Inf values", path=checkpoint.source_path, module=block.path
                    )
            paths = [block.path for block in chain.blocks]

            def products(official: bool, paths=paths, factors=factors) -> list:
                return [
                    base_products(base, located, readers, stack, path, B, official)
                    for path, (B, _) in zip(paths, factors, strict=True)
                ]

            plain = _apply_rule(checkpoint, factors, norms, options, stats, paths, products)
            merged += [(chain.name, n, chain.blocks[n], p) for n, p in enumerate(plain)]
    pad_to = max(p.A.shape[0] for *_, p in merged) if options.uniform_rank else None
    modules, reports = {}, []
    for chain_name, n, block, plain in merged:
        out = rules.plain_factors(
            plain, config.lora_alpha, config.rank, rank=options.rank, pad_to=pad_to
        )
        modules[block.path] = LoraModule(
            block.path, LazyTensor.of(out.A), LazyTensor.of(out.B), out.alpha
        )
        reports.append(
            BlockReport(
                block.path,
                chain_name,
                n,
                block.layer,
                plain.rule,
                out.rank,
                out.alpha,
                plain.exact and out.relative_error == 0.0,
                dict(plain.coefficients),
                dict(plain.norms),
                list(plain.stacked),
                out.energy_kept,
                out.relative_error,
            )
        )
    if options.rank is not None:
        estimator += f", compressed to rank {options.rank} (QR-core SVD)"
    elif pad_to is not None:
        estimator += f", zero-padded to rank {pad_to}"
    architectures = base.config.get("architectures") or []
    causal = any(str(a).endswith("ForCausalLM") for a in architectures)
    adapter = Adapter(
        modules=modules,
        base_model=str(base_ref),
        source_format="reslora",
        source_path=str(checkpoint_path),
        task_type="CAUSAL_LM" if causal else None,
        metadata={"reslora.type": checkpoint.kind, "reslora.estimator": estimator},
    )
    return ResLoraConversion(checkpoint, adapter, reports, estimator)


def _apply_rule(checkpoint, factors, norms, options, stats, paths, products):
    config = checkpoint.config
    s, kind = config.scale, checkpoint.kind
    if kind == "none":
        return rules.merge_none(factors, s)
    if kind == "bs":
        return rules.merge_bs(factors, s, config.pre_num)
    if kind == "is":
        if norms == "inputs":
            return rules.merge_is_inputs(factors, s, [stats[p]["input_norm"] for p in paths])
        if norms == "official":
            return rules.merge_is_official(factors, s, products(True))
        return rules.merge_is_weights(factors, s, products(False))
    if options.ms_rule == "scalar":
        middle = [stats[p]["middle_norm"] for p in paths]
        return rules.merge_ms_scalar(factors, s, config.pre_num, middle)
    if norms == "inputs":
        inputs = [stats[p]["input_norm"] for p in paths]
        return rules.merge_ms_amerge_inputs(factors, s, config.pre_num, inputs)
    return rules.merge_ms_amerge_weights(factors, s, config.pre_num, products(False))


def base_products(
    base: BaseModel,
    located: dict[str, tuple[str, TensorEntry]],
    readers: dict[str, SafetensorsReader],
    stack: ExitStack,
    path: str,
    B: torch.Tensor,
    official: bool,
) -> rules.BaseProducts:
    """||W||_F^2, B^T W and (official) W B for the base weight at `path`, read in row tiles."""
    name = f"{path}.weight"
    shard, entry = located[name]
    if shard not in readers:
        readers[shard] = stack.enter_context(SafetensorsReader(base.shard_path(shard)))
    reader = readers[shard]
    rows, cols = entry.shape
    tile = max(1, TILE_BYTES // (8 * cols))
    norm_sq = 0.0
    bt_w = torch.zeros(B.shape[1], cols, dtype=torch.float64)
    w_b = torch.zeros(rows, B.shape[1], dtype=torch.float64) if official else None
    for start in range(0, rows, tile):
        stop = min(rows, start + tile)
        w = reader.read(name, rows=(start, stop)).to(torch.float64)
        norm_sq += float((w * w).sum())
        bt_w += B[start:stop].T @ w
        if w_b is not None:
            w_b[start:stop] = w @ B
    return rules.BaseProducts(norm_sq, bt_w, w_b)


def check_against_base(checkpoint: ResLoraCheckpoint, base: BaseModel) -> None:
    """Every block fits its base weight, and every base linear of a chain's name has a block."""
    located = base.locate()
    groups: dict[str, list] = {}
    for _, _, block in checkpoint.blocks():
        groups.setdefault(block.name, []).append(block)
    for name, blocks in groups.items():
        for block in blocks:
            if f"{block.path}.weight" not in located:
                raise ShapeMismatchError(
                    f"the base has no tensor {block.path}.weight",
                    path=base.root,
                    module=block.path,
                    hint="pass the base model the ResLoRA checkpoint was trained on",
                )
        blocks = sorted(blocks, key=lambda b: reslora_format.natural_order(b.path))
        for before, block in zip([None, *blocks], blocks, strict=False):
            shape = tuple(located[f"{block.path}.weight"][1].shape)
            if shape == block.shape:
                continue
            where = ""
            if before is not None and before.shape != block.shape:
                where = (
                    f" (the {name} factors change shape between {before.path} and this layer, "
                    "while the base weights do not)"
                )
            raise ShapeMismatchError(
                f"the factors make a {block.shape[0]} x {block.shape[1]} update but the base "
                f"weight is {' x '.join(map(str, shape))}{where}",
                path=checkpoint.source_path,
                module=block.path,
                hint="the checkpoint does not belong to this base, or it is damaged",
            )
        covered = {block.path for block in blocks}
        for tensor, (_, entry) in located.items():
            path = tensor.removesuffix(".weight")
            if (
                tensor.endswith(".weight")
                and len(entry.shape) == 2
                and path.rsplit(".", 1)[-1] == name
                and path not in covered
            ):
                raise FormatError(
                    f"has no block for {path}, which the base has: the {name} chain is "
                    "missing a block",
                    path=checkpoint.source_path,
                    hint="ResLoRA wraps every linear of a target name; the file is incomplete",
                )


# ---------------------------------------------------------------- calibration statistics


def read_stats(path: Path, checkpoint: ResLoraCheckpoint) -> dict[str, dict[str, float]]:
    """Per block path: input_norm and middle_norm, checked to cover the whole checkpoint."""
    data = read_json(Path(path))
    if data.get("format") != STATS_FORMAT or data.get("version") != STATS_VERSION:
        raise FormatError(
            f"is not a {STATS_FORMAT} file (version {STATS_VERSION})",
            path=path,
            hint="make one with `loramerge reslora-stats`",
        )
    blocks = data.get("blocks")
    if not isinstance(blocks, dict):
        raise FormatError("has no 'blocks' object", path=path)
    found = {}
    for _, _, block in checkpoint.blocks():
        entry = blocks.get(block.path)
        if not isinstance(entry, dict):
            raise FormatError(
                f"has no statistics for block {block.path}",
                path=path,
                hint="the statistics were made for another checkpoint; run reslora-stats again",
            )
        values = {}
        for key in ("input_norm", "middle_norm"):
            value = entry.get(key)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise FormatError(
                    f"{key} must be a finite number >= 0, got {value!r}",
                    path=path,
                    module=block.path,
                )
            values[key] = float(value)
        found[block.path] = values
    return found


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
