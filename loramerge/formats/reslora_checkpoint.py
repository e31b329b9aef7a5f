"""Official ResLoRA checkpoints: the config, the `.loras.<i>.lora_A/B` keys, the block chains."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge.adapter import LazyTensor
from loramerge.errors import FormatError
from loramerge.formats.common import lazy_weights
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
class ResLoraBlock:
    """One ResLoRA linear: its path in the base and its LoRAs [(B_i, A_i)], which sum."""

    path: str
    layer: int | None
    loras: list[tuple[LazyTensor, LazyTensor]]

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the update."""
        return self.loras[0][0].shape[0], self.loras[0][1].shape[1]

    @property
    def rank(self) -> int:
        return sum(a.shape[0] for _, a in self.loras)

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with B = [B_0, B_1, ...] and A = [A_0; A_1; ...]: B A = sum_i B_i A_i exactly.

        Stacking keeps every LoRA's own middle slots, so each training-time forward of
        docs/rules.md section 4 with summed LoRAs is the same forward on the stacked pair. The
        stored tensors are read, not kept: a conversion forms each block when it needs it.
        """
        bs = [b.read().to(dtype) for b, _ in self.loras]
        As = [a.read().to(dtype) for _, a in self.loras]
        return torch.cat(bs, dim=1), torch.cat(As, dim=0)


@dataclass
class ResLoraChain:
    """Blocks linked to their predecessor: block n's previous block is blocks[n - 1]."""

    name: str
    blocks: list[ResLoraBlock]


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
        chains=_chains(blocks, path),
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
        blocks.append(ResLoraBlock(module_path, _layer_of(module_path), pairs))
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


def _layer_of(module_path: str) -> int | None:
    numbers = [int(part) for part in module_path.split(".") if part.isdigit()]
    return numbers[0] if len(numbers) == 1 else None


def natural_order(module_path: str) -> tuple:
    """Natural order (layers.10 after layers.9): the order the model's modules run in."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in module_path.split("."))


def _chains(blocks: list[ResLoraBlock], path: Path) -> list[ResLoraChain]:
    """Blocks grouped by module name in layer order, linked only where the shapes match."""
    groups: dict[str, list[ResLoraBlock]] = {}
    for block in sorted(blocks, key=lambda b: natural_order(b.path)):
        groups.setdefault(block.name, []).append(block)
    chains = []
    for name, members in sorted(groups.items()):
        _check_no_gap(name, members, path)
        current: list[ResLoraBlock] = []
        for block in members:
            if current and current[-1].shape != block.shape:
                chains.append(ResLoraChain(_chain_name(name, chains), current))
                current = []
            current.append(block)
        chains.append(ResLoraChain(_chain_name(name, chains), current))
    return chains


def _chain_name(name: str, chains: list[ResLoraChain]) -> str:
    taken = sum(1 for chain in chains if chain.name.split("#")[0] == name)
    return name if taken == 0 else f"{name}#{taken + 1}"


def _check_no_gap(name: str, members: list[ResLoraBlock], path: Path) -> None:
    """Paths that differ only in their layer number must cover consecutive layers."""
    skeletons = {re.sub(r"\.\d+(?=\.|$)", ".#", b.path) for b in members}
    layers = [b.layer for b in members]
    if len(skeletons) != 1 or any(layer is None for layer in layers):
        return
    for before, after in itertools.pairwise(members):
        assert before.layer is not None and after.layer is not None
        if after.layer != before.layer + 1:
            missing = before.path.replace(f".{before.layer}.", f".{before.layer + 1}.", 1)
            raise FormatError(
                f"has no block for {missing} between layers {before.layer} and {after.layer} "
                f"of the {name} chain",
                file=path,
                hint="a ResLoRA chain needs every layer's block; the checkpoint is incomplete",
            )
