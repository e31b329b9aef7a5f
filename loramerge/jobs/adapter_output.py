"""Writing an adapter as a job's output: an engine profile applied first, the file or folder
written atomically, never over or inside one of the inputs."""

from __future__ import annotations

from pathlib import Path

from loramerge.adapter import Adapter
from loramerge.engines.profiles import apply_engine
from loramerge.errors import OptionError
from loramerge.formats.registry import output_format
from loramerge.io.atomic import atomic_output, check_output_target
from loramerge.model.folder import base_config_of


def write_adapter(
    adapter: Adapter,
    out: str | Path,
    to: str = "peft",
    *,
    force: bool = False,
    inputs: list[Path] | None = None,
    engine: str | None = None,
    base: str | Path | None = None,
    report: dict | None = None,
) -> Path:
    """Write an adapter atomically in the named output format.

    `engine` first rewrites the adapter for that inference engine (loramerge.engines.profiles) or
    refuses it; `base` (a model folder or hub id; only its config.json is read) tells the
    profiles and the GGUF writer the architecture. `report`, when given, receives what the
    profile changed and how to start the engine (`notes`, `launch`, `launch_args`).
    """
    out = Path(out)
    entry = output_format(to)
    engine = engine or entry.engine
    needed = engine is not None or entry.needs_base
    base_config = base_config_of(base) if base is not None and needed else None
    if entry.needs_base and base_config is None:
        raise OptionError(
            f"--to {to} needs --base: the base model's config.json gives the architecture"
        )
    if engine is not None:
        profiled = apply_engine(adapter, engine, to, base_config)
        adapter = profiled.adapter
        if report is not None:
            report.update(profiled.summary())
    # the base is an input too: OUT must never replace or sit inside it
    bases = [Path(base)] if base is not None else []
    check_output_target(out, [*(inputs or []), *bases], force)
    with atomic_output(out, is_dir=entry.is_dir) as temp:
        if entry.needs_base:
            entry.write(adapter, temp, base_config)
        else:
            entry.write(adapter, temp)
    return out
