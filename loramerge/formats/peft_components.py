"""PEFT output of an adapter for several models of a pipeline: one PEFT adapter folder per
component, in subfolders named like the pipeline's (`unet/`, `text_encoder/`); a PEFT adapter
wraps one model. A one-model adapter is written as one PEFT folder, as before."""

from __future__ import annotations

from pathlib import Path

from loramerge.adapter import Adapter
from loramerge.formats import peft_writer
from loramerge.formats.components import split


def write(adapter: Adapter, folder: Path) -> None:
    """Write into an existing (empty, temporary) folder."""
    parts = split(adapter)
    if len(parts) == 1:
        peft_writer.write(next(iter(parts.values())), folder)
        return
    for component, part in parts.items():
        sub = folder / str(component)
        sub.mkdir()
        peft_writer.write(part, sub)
