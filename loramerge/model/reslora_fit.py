"""A ResLoRA checkpoint fitted to its base: every block has a base weight of its shape, and every
linear of a chain's name has a block (ResLoRA wraps them all)."""

from __future__ import annotations

from loramerge.errors import FormatError, ShapeMismatchError
from loramerge.formats.reslora_chains import natural_order
from loramerge.formats.reslora_checkpoint import ResLoraCheckpoint
from loramerge.model.folder import BaseModel


def check_against_base(checkpoint: ResLoraCheckpoint, base: BaseModel) -> None:
    """Every block fits its base weight, and every base linear of a chain's name has a block."""
    located = base.locate()
    groups: dict[str, list] = {}
    for _, _, block in checkpoint.blocks():
        groups.setdefault(block.name, []).append(block)
    for name, blocks in groups.items():
        blocks = sorted(blocks, key=lambda b: natural_order(b.path))
        _check_shapes(checkpoint, base, located, name, blocks)
        _check_complete(checkpoint, located, name, {block.path for block in blocks})


def _check_shapes(
    checkpoint: ResLoraCheckpoint, base: BaseModel, located: dict, name: str, blocks: list
) -> None:
    for block in blocks:
        if f"{block.path}.weight" not in located:
            raise ShapeMismatchError(
                f"the base has no tensor {block.path}.weight",
                file=base.root,
                module=block.path,
                hint="pass the base model the ResLoRA checkpoint was trained on",
            )
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
            file=checkpoint.source_path,
            module=block.path,
            hint="the checkpoint does not belong to this base, or it is damaged",
        )


def _check_complete(
    checkpoint: ResLoraCheckpoint, located: dict, name: str, covered: set[str]
) -> None:
    for tensor, (_, entry) in located.items():
        path = tensor.removesuffix(".weight")
        if (
            tensor.endswith(".weight")
            and len(entry.shape) == 2
            and path.rsplit(".", 1)[-1] == name
            and path not in covered
        ):
            raise FormatError(
                f"has no block for {path}, which the base has: the {name} chain is missing a block",
                file=checkpoint.source_path,
                hint="ResLoRA wraps every linear of a target name; the file is incomplete",
            )
