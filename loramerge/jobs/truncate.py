"""`truncate`: read an adapter, cut or reduce its rank, write adapters or merged model folders."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter
from loramerge.adapter_checks import check_adapter
from loramerge.errors import OptionError
from loramerge.formats import dylora
from loramerge.formats.registry import ReadOptions, check_user_alpha, output_format, read_adapter
from loramerge.io.atomic import atomic_output, check_output_target
from loramerge.jobs.adapter_output import write_adapter
from loramerge.model.stream import Progress
from loramerge.ops.rank_truncation import ModuleRow, check_prefix_rank, reduce_svd, truncate_prefix

METHODS = ("prefix", "svd", "dylora")  # dylora = prefix, declaring the input to be DyLoRA


@dataclass
class TruncateOutput:
    """One written output: `rank` is None for an energy-chosen reduction."""

    rank: int | None
    out: str
    parameters: int  # LoRA parameters of the truncated adapter
    modules: list[ModuleRow]


@dataclass
class TruncateResult:
    source: str
    input_format: str
    method: str  # "prefix" or "svd"
    output: str  # "peft", "kohya" or "merged"
    outputs: list[TruncateOutput] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_ranks(text: str) -> list[int]:
    """'8' -> [8]; '4,8,16' -> [4, 8, 16] (sorted, duplicates dropped)."""
    ranks = set()
    for part in text.split(","):
        part = part.strip()
        if not part.lstrip("-").isdigit():
            raise OptionError(f"--rank takes integers like 8 or 4,8,16, got {text!r}")
        ranks.add(int(part))
    return sorted(ranks)


def resolve_method(adapter: Adapter, method: str | None, energy: float | None) -> str:
    """prefix for DyLoRA inputs, svd otherwise; `dylora` declares any input to be DyLoRA."""
    if method is not None and method not in METHODS:
        raise OptionError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if energy is not None:
        if method in ("prefix", "dylora"):
            raise OptionError(
                "--energy chooses ranks by SVD energy; it works with --method svd only"
            )
        return "svd"
    if method == "dylora":
        return "prefix"
    if method == "prefix" and not dylora.is_dylora(adapter):
        raise OptionError(
            f"--method prefix keeps the first ranks of a DyLoRA adapter, and this input is "
            f"{adapter.source_format}, not DyLoRA",
            path=adapter.source_path,
            hint="pass --method dylora if it was trained with DyLoRA, or use --method svd",
        )
    if method is None:
        return "prefix" if dylora.is_dylora(adapter) else "svd"
    return method


def truncate_adapter(
    source: str | Path,
    out: str | Path,
    *,
    ranks: list[int] | None = None,
    method: str | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    alpha: float | None = None,
    to: str | None = None,
    base: str | Path | None = None,
    merge: bool = False,
    dtype: str | None = None,
    fmt: str | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
    engine: str | None = None,
    report: dict[str, Any] | None = None,
) -> TruncateResult:
    """Truncate or reduce SOURCE to each rank in `ranks` (or by `energy`) and write OUT.

    One rank writes OUT itself; several write OUT/rank-<b> (a PEFT or merged folder, or a kohya
    `rank-<b>.safetensors`) inside one atomically created folder OUT.
    """
    source, out = Path(source), Path(out)
    _check_options(ranks, energy, max_rank, to, base, merge, dtype)
    if engine is not None:  # --engine: rewrite each output for that engine (loramerge.engines)
        from loramerge.engines.profiles import engine_profile

        if merge:
            raise OptionError("--engine rewrites an adapter; with --merge the output is a model")
        to = to or engine_profile(engine).formats[0]
    adapter = read_adapter(source, fmt, ReadOptions(alpha=alpha, base=base))
    check_user_alpha(adapter, alpha, source)
    check_adapter(adapter, allow_nonfinite)
    chosen = resolve_method(adapter, method, energy)
    if base is not None and not merge:
        from loramerge.model.fit import rename_to_base

        adapter = rename_to_base(adapter, base)
        if adapter.base_model is None:
            adapter = replace(adapter, base_model=str(base))
    target = "merged" if merge else (to or _default_output(adapter))
    if not merge:
        output_format(target)
    result = TruncateResult(str(source), adapter.source_format, chosen, target)

    jobs: list[tuple[int | None, Adapter, list[ModuleRow]]] = []
    if energy is not None:
        reduced, rows = reduce_svd(adapter, energy=energy, max_rank=max_rank)
        jobs.append((None, reduced, rows))
    else:
        for rank in ranks or []:
            if chosen == "prefix":
                r_by_module = {path: m.r for path, m in adapter.modules.items()}
                try:
                    unit = dylora.unit_of(adapter)
                    result.warnings += check_prefix_rank(rank, r_by_module, unit)
                except OptionError as exc:  # name the adapter whose rank is out of range
                    raise OptionError(
                        exc.message, path=source, module=exc.module, hint=exc.hint
                    ) from None
                new, rows = truncate_prefix(adapter, rank)
            else:
                _check_svd_rank(rank, adapter)
                new, rows = reduce_svd(adapter, rank=rank)
            jobs.append((rank, new, rows))

    def write(new: Adapter, path: Path) -> None:
        new = replace(new, metadata=_output_metadata(new, chosen))
        if merge:
            from loramerge.jobs.merge import merge_adapter

            merged = merge_adapter(
                new, base, path, dtype=dtype, force=force, progress=progress, extra_inputs=[source]
            )
            result.warnings.extend(merged.warnings)
        else:
            part: dict[str, Any] = {}
            write_adapter(
                new, path, target, force=force, inputs=[source], engine=engine, base=base,
                report=part,
            )  # fmt: skip
            if report is not None and part:
                from loramerge.engines.profiles import combine_reports

                combine_reports(report, part)

    if len(jobs) == 1:
        rank, new, rows = jobs[0]
        write(new, out)
        result.outputs.append(TruncateOutput(rank, str(out), new.parameter_count(), rows))
        return result
    inputs = [source] + ([Path(base)] if base is not None else [])
    check_output_target(out, inputs, force)
    with atomic_output(out, is_dir=True) as temp:
        for rank, new, _ in jobs:
            write(new, temp / _output_name(rank, target))
    for rank, new, rows in jobs:
        path = out / _output_name(rank, target)
        result.outputs.append(TruncateOutput(rank, str(path), new.parameter_count(), rows))
    return result


def _check_options(
    ranks: list[int] | None,
    energy: float | None,
    max_rank: int | None,
    to: str | None,
    base: str | Path | None,
    merge: bool,
    dtype: str | None,
) -> None:
    if ranks and energy is not None:
        raise OptionError("give --rank or --energy, not both")
    if not ranks and energy is None:
        raise OptionError("give a target --rank (e.g. 8 or 4,8,16) or an --energy share")
    if energy is not None and (
        isinstance(energy, bool) or not math.isfinite(energy) or not 0 < energy <= 1
    ):
        raise OptionError(f"--energy must be a share in (0, 1], e.g. 0.9, got {energy!r}")
    if max_rank is not None and energy is None:
        raise OptionError("--max-rank caps the ranks that --energy chooses; give --energy too")
    if max_rank is not None and max_rank < 1:
        raise OptionError(f"--max-rank must be at least 1, got {max_rank}")
    if merge and base is None:
        raise OptionError("--merge needs the base model: give --base")
    if merge and to is not None:
        raise OptionError("--to names an adapter format; with --merge the output is a model")
    if dtype is not None and not merge:
        raise OptionError("--dtype sets the merged model's dtype; it needs --merge")


def _check_svd_rank(rank: int, adapter: Adapter) -> None:
    if rank < 1:
        raise OptionError(f"rank must be an integer >= 1, got {rank}")
    r_max = max(adapter.ranks, default=0)
    if rank > r_max:
        raise OptionError(
            f"rank {rank} is above the adapter's largest rank r_max = {r_max}: nothing to reduce",
            path=adapter.source_path,
            hint=f"choose a rank from 1 to {r_max}",
        )


def _default_output(adapter: Adapter) -> str:
    """kohya inputs stay kohya files; everything else (official DyLoRA too) becomes PEFT."""
    return "kohya" if adapter.source_format.startswith("kohya") else "peft"


def _output_name(rank: int | None, target: str) -> str:
    name = f"rank-{rank}"
    return name + ".safetensors" if target == "kohya" else name


def _output_metadata(adapter: Adapter, method: str) -> dict[str, str]:
    """kohya metadata for the output: the writer sets ss_network_dim (and ss_network_alpha when
    all alphas agree); a stale alpha must not survive, and an SVD result is no longer DyLoRA."""
    metadata = dict(adapter.metadata)
    metadata.pop("ss_network_alpha", None)
    if method == "svd" and metadata.get("ss_network_module") == "networks.dylora":
        metadata["ss_network_module"] = "networks.lora"
        metadata.pop(dylora.UNIT_KEY, None)
        try:
            args = json.loads(metadata.get("ss_network_args") or "{}")
        except json.JSONDecodeError:
            args = {}
        if isinstance(args, dict):
            args.pop("unit", None)
            metadata["ss_network_args"] = json.dumps(args)
    return metadata
