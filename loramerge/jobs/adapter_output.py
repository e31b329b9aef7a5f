"""Writing an adapter as a job's output: the format and engine settled before any work, the
engine profile applied, the file or folder written atomically, never over or inside an input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter
from loramerge.adapter_checks import refuse_dense_updates
from loramerge.engines.profiles import BaseFacts, apply_engine, engine_profile, output_for
from loramerge.errors import UsageError, opt
from loramerge.formats.registry import OutputFormat, check_output_name, output_format
from loramerge.io.atomic import atomic_output, check_output_target
from loramerge.model.folder import base_config_of, open_base


@dataclass(frozen=True)
class AdapterOutput:
    """How a job writes its adapter: the format, the engine profile applied first (the
    format's own, e.g. llama.cpp for GGUF, when none is asked for) and the base model (a folder
    or hub id) whose config and tables the profile and the writer may read."""

    entry: OutputFormat
    engine: str | None = None
    base: str | Path | None = None


def choose_output(
    to: str | None,
    engine: str | None,
    base: str | Path | None,
    *,
    default: str | None = "peft",
) -> AdapterOutput:
    """The output asked for: `to`, else the engine's format, else `default`; refuses unknown
    names, a format the engine does not load and a GGUF without a base."""
    name = output_for(engine, to) or default
    if name is None:
        raise UsageError(
            f"name the output format, or an engine whose format to write ({opt('engine')})",
            option="to",
        )
    entry = output_format(name)
    engine = engine_profile(engine).name if engine is not None else entry.engine
    if entry.needs_base and base is None:
        raise UsageError(
            f"needs {opt('base')}: the base model's config.json gives the architecture",
            option="to",
            value=name,
        )
    return AdapterOutput(entry, engine, base)


def base_facts(base: str | Path | None) -> BaseFacts:
    """What the engine profiles may read of the base: its config, and its tensors on demand."""
    if base is None:
        return BaseFacts()
    return BaseFacts(base_config_of(base), lambda name: open_base(base).read_tensor(name))


def check_adapter_output(
    out: str | Path, output: AdapterOutput, inputs: Sequence[Path], force: bool
) -> None:
    """What can be known about OUT before any work: its name fits the format, and it is free
    (or `force`) and neither an input nor inside one."""
    out = Path(out)
    check_output_name(out, output.entry)
    bases = [Path(output.base)] if output.base is not None else []
    check_output_target(out, [*inputs, *bases], force)


def write_adapter(
    adapter: Adapter,
    out: str | Path,
    output: AdapterOutput,
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
) -> dict[str, Any]:
    """Write `adapter` at `out` as `output` says, atomically.

    Returns what the engine profile changed and how to start the engine (`engine`, `notes`,
    `launch`, `launch_args`), or {} when no profile applies.
    """
    out = Path(out)
    refuse_dense_updates(adapter, "an adapter file")
    check_adapter_output(out, output, inputs, force)
    facts = base_facts(output.base)
    report: dict[str, Any] = {}
    if output.engine is not None:
        profiled = apply_engine(adapter, output.engine, output.entry.name, facts)
        adapter = profiled.adapter
        report = profiled.summary()
    with atomic_output(out, is_dir=output.entry.is_dir) as temp:
        output.entry.write(adapter, temp, facts.config)
    return report
