"""The ResLoRA statistics file that `reslora-stats` writes and `reslora --stats` reads: per
block, the mean input norm and middle-vector norm on calibration text (JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loramerge.errors import FormatError
from loramerge.formats.reslora_checkpoint import ResLoraCheckpoint
from loramerge.io.json_files import read_json

STATS_FORMAT = "loramerge-reslora-stats"
STATS_VERSION = 1


def stats_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def read_stats(path: Path, checkpoint: ResLoraCheckpoint) -> dict[str, dict[str, float]]:
    """Per block path: input_norm and middle_norm, checked to cover the whole checkpoint."""
    data = read_json(Path(path))
    if data.get("format") != STATS_FORMAT or data.get("version") != STATS_VERSION:
        raise FormatError(
            f"is not a {STATS_FORMAT} file (version {STATS_VERSION})",
            file=path,
            hint="make one with `loramerge reslora-stats`",
        )
    blocks = data.get("blocks")
    if not isinstance(blocks, dict):
        raise FormatError("has no 'blocks' object", file=path)
    found = {}
    for _, _, block in checkpoint.blocks():
        entry = blocks.get(block.path)
        if not isinstance(entry, dict):
            raise FormatError(
                f"has no statistics for block {block.path}",
                file=path,
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
                    file=path,
                    module=block.path,
                )
            values[key] = float(value)
        found[block.path] = values
    return found
