"""`truncate`: read an adapter, cut or reduce its rank, write adapters or merged model folders."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter
from loramerge.adapter_checks import read_checked, refuse_dense_updates
from loramerge.engines.profiles import combine_reports
from loramerge.errors import OptionError, UsageError, located, opt
from loramerge.formats import dylora
from loramerge.formats.registry import ReadOptions, check_output_name
from loramerge.io.atomic import atomic_output, check_output_target
from loramerge.io.dtypes import output_code
from loramerge.jobs.adapter_output import AdapterOutput, choose_output, write_adapter
from loramerge.jobs.defaults import TRUNCATE_METHODS
from loramerge.jobs.merge import merge_adapter
from loramerge.jobs.options import check_choice, check_rank, check_share, exclusive, needs
from loramerge.jobs.pipeline_base import fit_components
from loramerge.model.stream_stats import Progress
from loramerge.ops.rank_truncation import ModuleRow, check_prefix_rank, reduce_svd, truncate_prefix


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
    engine: dict[str, Any] = field(default_factory=dict)  # the engine profile's report

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.engine:
            del data["engine"]
        return data


@dataclass(frozen=True)
class TruncateOptions:
    """How to truncate: target `ranks` (one output each) or an `energy` share per module
    (capped at `max_rank`), by `method`; written as `to` (or for `engine`), or with `merge`
    as merged models in `dtype`."""

    ranks: tuple[int, ...] = ()
    method: str | None = None
    energy: float | None = None
    max_rank: int | None = None
    to: str | None = None
    engine: str | None = None
    merge: bool = False
    dtype: str | None = None

    def check(self, base: str | Path | None) -> None:
        """Every check that needs no input: values in range, options that fit together."""
        for rank in self.ranks:
            check_rank(rank)
        if self.method is not None:
            check_choice(self.method, TRUNCATE_METHODS, "method")
        exclusive("rank", bool(self.ranks), "energy", self.energy is not None)
        if not self.ranks and self.energy is None:
            raise UsageError(
                f"give a target rank (e.g. 8 or 4,8,16) or an energy share ({opt('energy')})",
                option="rank",
            )
        if self.energy is not None:
            check_share(self.energy, "energy")
        needs("max_rank", self.max_rank is not None, "energy", self.energy is not None)
        if self.max_rank is not None:
            check_rank(self.max_rank, "max_rank")
        if self.energy is not None and self.method in ("prefix", "dylora"):
            raise UsageError(
                f"chooses ranks by SVD energy; it works with {opt('method')} svd only",
                option="energy",
            )
        needs("merge", self.merge, "base", base is not None, "the merged model is the base's")
        exclusive("to", self.to is not None, "merge", self.merge)
        exclusive("engine", self.engine is not None, "merge", self.merge)
        needs("dtype", self.dtype is not None, "merge", self.merge, "it sets the model's dtype")
        output_code(self.dtype)


def resolve_method(adapter: Adapter, method: str | None, energy: float | None) -> str:
    """prefix for DyLoRA inputs, svd otherwise; `dylora` declares any input to be DyLoRA."""
    if energy is not None:
        return "svd"
    if method == "dylora":
        return "prefix"
    if method == "prefix" and not dylora.is_dylora(adapter):
        raise OptionError(
            f"keeps the first ranks of a DyLoRA adapter, and this input is "
            f"{adapter.source_format}, not DyLoRA",
            file=adapter.source_path,
            option="method",
            value=method,
            hint=f"pass {opt('method')} dylora if it was trained with DyLoRA, or use "
            f"{opt('method')} svd",
        )
    if method is None:
        return "prefix" if dylora.is_dylora(adapter) else "svd"
    return method


def truncate_adapter(
    source: str | Path,
    out: str | Path,
    options: TruncateOptions,
    *,
    alpha: float | None = None,
    base: str | Path | None = None,
    fmt: str | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> TruncateResult:
    """Truncate or reduce SOURCE to each rank of `options` (or by energy) and write OUT.

    One rank writes OUT itself; several write OUT/rank-<b> (a PEFT or merged folder, or a kohya
    `rank-<b>.safetensors`) inside one atomically created folder OUT.
    """
    source, out = Path(source), Path(out)
    options.check(base)
    read = ReadOptions(alpha=alpha, base=base)
    adapter = read_checked(source, fmt, read, allow_nonfinite=allow_nonfinite)
    refuse_dense_updates(adapter, "truncation")
    method = resolve_method(adapter, options.method, options.energy)
    if base is not None and not options.merge:
        adapter = fit_components(adapter, base)
        if adapter.base_model is None:
            adapter = replace(adapter, base_model=str(base))
    output = None
    if not options.merge:
        output = choose_output(options.to, options.engine, base, default=_default_output(adapter))
    target = output.entry.name if output is not None else "merged"
    result = TruncateResult(str(source), adapter.source_format, method, target)
    _check_outputs(out, options, output, [source], base, force)
    reduced = _reduce(adapter, method, options, result)
    writer = _Writer(method, output, base, options.dtype, force, [source], progress, result)
    if len(reduced) == 1:
        rank, new, rows = reduced[0]
        writer.write(new, out)
        result.outputs.append(TruncateOutput(rank, str(out), new.parameter_count(), rows))
        return result
    with atomic_output(out, is_dir=True) as temp:
        for rank, new, _ in reduced:
            writer.write(new, temp / _output_name(rank, target))
    for rank, new, rows in reduced:
        path = out / _output_name(rank, target)
        result.outputs.append(TruncateOutput(rank, str(path), new.parameter_count(), rows))
    return result


def _check_outputs(
    out: Path,
    options: TruncateOptions,
    output: AdapterOutput | None,
    inputs: list[Path],
    base: str | Path | None,
    force: bool,
) -> None:
    """OUT checked before any work: one output is OUT itself, several live in the folder OUT."""
    if len(options.ranks) > 1:
        check_output_name(out, None, what="a folder of outputs, one per rank")
    else:
        check_output_name(out, output.entry if output is not None else None)
    bases = [Path(base)] if base is not None else []
    check_output_target(out, [*inputs, *bases], force)


def _reduce(
    adapter: Adapter, method: str, options: TruncateOptions, result: TruncateResult
) -> list[tuple[int | None, Adapter, list[ModuleRow]]]:
    """(rank, reduced adapter, rows) for each output; rank None for an energy reduction."""
    # a merge reads each module's reduction when it reaches the module: none is held
    keep = not options.merge
    if options.energy is not None:
        energy, max_rank = options.energy, options.max_rank
        reduced, rows = reduce_svd(adapter, energy=energy, max_rank=max_rank, keep=keep)
        return [(None, reduced, rows)]
    found = []
    for rank in options.ranks:
        if method == "prefix":
            r_by_module = {path: m.r for path, m in adapter.modules.items()}
            with located(adapter.source_path):
                result.warnings += check_prefix_rank(rank, r_by_module, dylora.unit_of(adapter))
            new, rows = truncate_prefix(adapter, rank)
        else:
            _check_svd_rank(rank, adapter)
            new, rows = reduce_svd(adapter, rank=rank, keep=keep)
        found.append((rank, new, rows))
    return found


@dataclass
class _Writer:
    """Writes each reduced adapter as the job's output: an adapter, or a merged model."""

    method: str
    output: AdapterOutput | None  # None: merged models
    base: str | Path | None
    dtype: str | None
    force: bool
    inputs: list[Path]
    progress: Progress | None
    result: TruncateResult

    def write(self, new: Adapter, path: Path) -> None:
        new = replace(new, metadata=_output_metadata(new, self.method))
        if self.output is None:
            assert self.base is not None
            merged = merge_adapter(
                new,
                self.base,
                path,
                dtype=self.dtype,
                force=self.force,
                progress=self.progress,
                extra_inputs=self.inputs,
            )
            self.result.warnings.extend(merged.warnings)
            return
        part = write_adapter(new, path, self.output, force=self.force, inputs=self.inputs)
        if part:
            combine_reports(self.result.engine, part)


def _check_svd_rank(rank: int, adapter: Adapter) -> None:
    r_max = max(adapter.ranks, default=0)
    if rank > r_max:
        raise OptionError(
            f"is above the adapter's largest rank r_max = {r_max}: nothing to reduce",
            file=adapter.source_path,
            option="rank",
            value=rank,
            hint=f"choose a rank from 1 to {r_max}",
        )


def _default_output(adapter: Adapter) -> str:
    """kohya and LyCORIS inputs become kohya files, diffusers files diffusers files; everything
    else (official DyLoRA too) becomes PEFT."""
    if adapter.source_format == "diffusers":
        return "diffusers"
    return "kohya" if adapter.source_format.startswith(("kohya", "lycoris")) else "peft"


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
