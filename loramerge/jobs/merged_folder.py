"""What makes streamed shards a model folder: the index, the (updated) config and the small
files of the base; and the written shards' headers checked against the plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loramerge.errors import OutputError
from loramerge.io.safetensors_header import read_header
from loramerge.model.folder import INDEX_NAME, BaseModel
from loramerge.model.plan import MergePlan


def write_folder_files(base: BaseModel, plan: MergePlan, folder: Path) -> None:
    """The index, the (updated) config and the small files that make it a model folder."""
    if len(plan.shards) > 1 or (base.has_index and len(plan.shards) == len(base.shard_names)):
        weight_map = {t.name: s.file_name for s in plan.shards for t in s.tensors}
        index = {
            "metadata": {"total_size": plan.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for path in base.extra_files():
        if path.name == "config.json":
            continue
        shutil.copyfile(path, folder / path.name)
    config_path = base.root / "config.json"
    if not config_path.exists():
        return
    if not plan.config_updates and "quantization_config" not in base.config:
        shutil.copyfile(config_path, folder / "config.json")
        return
    config = plan.config_for(base.config)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_written(plan: MergePlan, folder: Path) -> None:
    """Re-read every written shard's header and check it against the plan."""
    for shard in plan.shards:
        header = read_header(folder / shard.file_name)
        expected = [(t.name, t.dtype, t.shape) for t in shard.tensors]
        found = [(e.name, e.dtype, e.shape) for e in header.entries.values()]
        if expected != found:
            raise OutputError(
                "a written shard does not match its plan", file=folder / shard.file_name
            )
