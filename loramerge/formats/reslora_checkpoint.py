"""Official ResLoRA checkpoints: the config, the `.loras.<i>.lora_A/B` keys, the blocks (linked
into chains by loramerge.formats.reslora_chains)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from loramerge.adapter import LazyTensor
from loramerge.errors import FormatError
from loramerge.formats.common import lazy_weights
from loramerge.formats.reslora_chains import ResLoraBlock, ResLoraChain, layer_of, link_chains
from loramerge.formats.reslora_config import ResLoraConfig, parse_config
from loramerge.io.hub import resolve
from loramerge.io.json_files import read_json

CONFIG_NAME = "reslora_config.json"
WEIGHT_NAMES = ("pytorch_model_lora.bin", "pytorch_model_lora.safetensors")
TRAINER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TRAINER_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
METADATA_KEY = "reslora_config"  # a .safetensors file may carry its config in __metadata__
_KEY = re.compile(
    r"^(?:wrapped_model\.)?(?P<path>.+)\.loras\.(?P<index>\d+)\.lora_(?P<part>[AB])(?:\.weight)?$"
)


@dataclass
class ResLoraCheckpoint:
    config: ResLoraConfig
    chains: list[ResLoraChain]
    source_path: str
    layout: str  # "official", "trainer" or "safetensors"
    config_path: str = ""

    @property
    def kind(self) -> str:
        return self.config.kind

    def blocks(self) -> list[tuple[ResLoraChain, int, ResLoraBlock]]:
        return [(chain, n, block) for chain in self.chains for n, block in enumerate(chain.blocks)]


def read(path: str | Path) -> ResLoraCheckpoint:
    """A ResLoRA checkpoint (a local path or a cached hub repo id): an official or trainer
    folder, or a weights file with its config."""
    path = resolve(path, what="ResLoRA checkpoint")
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        found = _read_official(path)
    elif path.is_dir() and (path / "config.json").is_file():
        found = _read_trainer(path)
    elif path.is_file():
        found = _read_file(path)
    else:
        raise FormatError(
            f"is neither a ResLoRA checkpoint folder ({CONFIG_NAME} or config.json with "
            "resconfig) nor a weights file",
            file=path,
        )
    config, config_path, tensors, layout = found
    blocks = _blocks(tensors, config, path)
    return ResLoraCheckpoint(
        config=config,
        chains=link_chains(blocks, path),
        source_path=str(path),
        layout=layout,
        config_path=str(config_path),
    )


_Found = tuple[ResLoraConfig, Path, dict[str, LazyTensor], str]


def _read_official(folder: Path) -> _Found:
    """The official layout: reslora_config.json beside pytorch_model_lora.bin."""
    config_path = folder / CONFIG_NAME
    config = parse_config(read_json(config_path), config_path)
    return config, config_path, _lora_tensors(_official_weights(folder)), "official"


def _read_trainer(folder: Path) -> _Found:
    """A full trainer checkpoint: the settings under `resconfig` in config.json, the ResLoRA
    keys beside the base weights."""
    config_path = folder / "config.json"
    model_config = read_json(config_path)
    if "resconfig" not in model_config:
        raise FormatError(
            "has no 'resconfig' entry: not a ResLoRA trainer checkpoint",
            file=config_path,
            hint=f"pass the folder with {CONFIG_NAME} and {WEIGHT_NAMES[0]}",
        )
    config = parse_config(model_config["resconfig"], config_path)
    tensors = {}
    for file in _trainer_weights(folder):
        tensors.update(_lora_tensors(file, required=False))
    if not tensors:
        raise FormatError(
            "has resconfig in config.json but no ResLoRA keys (<module>.loras.<i>.lora_A) "
            "in its weights",
            file=folder,
        )
    return config, config_path, tensors, "trainer"


def _read_file(path: Path) -> _Found:
    """A weights file whose config is in its metadata or in reslora_config.json beside it."""
    tensors_all, metadata = lazy_weights(path)
    tensors = _lora_tensors(path, tensors_all)
    config_path = path.parent / CONFIG_NAME
    if METADATA_KEY in metadata:
        try:
            data = json.loads(metadata[METADATA_KEY])
        except (ValueError, RecursionError) as exc:
            message = f"metadata {METADATA_KEY} is not JSON ({type(exc).__name__})"
            raise FormatError(message, file=path) from None
        config, config_path = parse_config(data, path), path
    elif config_path.is_file():
        config = parse_config(read_json(config_path), config_path)
    else:
        raise FormatError(
            f"has no ResLoRA config: no {METADATA_KEY} metadata and no {CONFIG_NAME} beside it",
            file=path,
            hint=f"put the training's {CONFIG_NAME} next to the file",
        )
    layout = "safetensors" if path.suffix == ".safetensors" else "official"
    return config, config_path, tensors, layout


def _official_weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise FormatError(
        f"has {CONFIG_NAME} but no {WEIGHT_NAMES[0]}",
        file=folder,
        hint="copy the LoRA weights saved with the config into the folder",
    )


def _trainer_weights(folder: Path) -> list[Path]:
    for name in TRAINER_INDEXES:
        if (folder / name).is_file():
            weight_map = read_json(folder / name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise FormatError("has no weight_map", file=folder / name)
            shards = sorted({str(s) for s in weight_map.values()})
            bad = [s for s in shards if Path(s).name != s or not (folder / s).is_file()]
            if bad:
                raise FormatError(f"names missing or outside shard {bad[0]!r}", file=folder / name)
            return [folder / s for s in shards]
    for name in TRAINER_WEIGHTS:
        if (folder / name).is_file():
            return [folder / name]
    raise FormatError("holds config.json with resconfig but no model weights", file=folder)


def _lora_tensors(
    path: Path, tensors: dict[str, LazyTensor] | None = None, required: bool = True
) -> dict[str, LazyTensor]:
    if tensors is None:
        tensors, _ = lazy_weights(path)
    found = {key: tensor for key, tensor in tensors.items() if _KEY.match(key)}
    if not found and required:
        sample = ", ".join(list(tensors)[:3])
        raise FormatError(
            f"holds no ResLoRA keys (<module>.loras.<i>.lora_A / .lora_B); found {sample}",
            file=path,
        )
    return found


def _blocks(
    tensors: dict[str, LazyTensor], config: ResLoraConfig, path: Path
) -> list[ResLoraBlock]:
    parts: dict[str, dict[int, dict[str, LazyTensor]]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        assert match is not None  # _lora_tensors kept matching keys only
        slot = parts.setdefault(match["path"], {}).setdefault(int(match["index"]), {})
        slot[match["part"]] = tensor
    counts: dict[int, str] = {}
    blocks = []
    for module_path, loras in parts.items():
        indices = sorted(loras)
        if indices != list(range(len(indices))):
            missing = min(set(range(len(indices) + 1)) - set(indices))
            raise FormatError(f"has no LoRA number {missing}", file=path, module=module_path)
        if len(indices) > config.lora_num:
            raise FormatError(
                f"holds {len(indices)} LoRAs but the config says lora_num {config.lora_num}",
                file=path,
                module=module_path,
            )
        counts.setdefault(len(indices), module_path)
        pairs = [_pair(loras[index], index, config, path, module_path) for index in indices]
        for index, (lora_b, lora_a) in zip(indices, pairs, strict=True):
            if (lora_b.shape[0], lora_a.shape[1]) != (pairs[0][0].shape[0], pairs[0][1].shape[1]):
                raise FormatError(
                    f"loras.{index} has another shape than loras.0", file=path, module=module_path
                )
        blocks.append(ResLoraBlock(module_path, layer_of(module_path), pairs))
    if len(counts) > 1:
        (few, first), (many, second) = sorted(counts.items())[:2]
        raise FormatError(
            f"{first} holds {few} LoRA(s) but {second} holds {many}: a block is incomplete",
            file=path,
        )
    return blocks


def _pair(
    slot: dict[str, LazyTensor], index: int, config: ResLoraConfig, path: Path, module: str
) -> tuple[LazyTensor, LazyTensor]:
    """(B, A) of LoRA number `index` of a block, checked to be rank-r factors."""
    for part in "AB":
        if part not in slot:
            raise FormatError(f"has no loras.{index}.lora_{part}", file=path, module=module)
    lora_b, lora_a = slot["B"], slot["A"]
    if len(lora_a.shape) != 2 or len(lora_b.shape) != 2:
        raise FormatError(
            f"loras.{index} factors A {list(lora_a.shape)} and B {list(lora_b.shape)} "
            "are not matrices",
            file=path,
            module=module,
        )
    if lora_a.shape[0] != config.rank or lora_b.shape[1] != config.rank:
        raise FormatError(
            f"loras.{index} has A {list(lora_a.shape)} and B {list(lora_b.shape)}, "
            f"but the config's rank is {config.rank}",
            file=path,
            module=module,
        )
    return lora_b, lora_a
