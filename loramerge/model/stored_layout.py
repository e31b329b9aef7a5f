"""Where an in-memory parameter lives in a model's files, from transformers' own conversion rules.

Current transformers renames some parameters when it loads a checkpoint and fuses others (MoE
experts stored one by one become one 3-D parameter), and reverses both when it saves. A merge
reads and writes the files, while PEFT names what is in memory, so every in-memory parameter is
mapped to the stored tensors that hold it: the names come from transformers' reversed transforms
(the functions `save_pretrained` itself uses), and each stored tensor is described as a view of
the parameter: which expert, which range of which dimension, transposed or not. The views are
computed here from the operations' documented meaning for the operations listed in
`_VIEW_OPERATIONS`; a parameter converted by any other operation is reported as unmapped, with
the operation's name, rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


class UnmappedLayout(Exception):
    """transformers converts this parameter with an operation loramerge does not map."""


@dataclass(frozen=True)
class StoredPiece:
    """One stored tensor that holds part of an in-memory parameter.

    The stored tensor equals `param[index]`, transposed when `transposed`: `index` has one entry
    per dimension of the parameter, an int (a dimension the piece drops, e.g. the expert) or a
    (start, stop) range.
    """

    name: str
    index: tuple[int | tuple[int, int], ...]
    transposed: bool = False

    def is_whole(self, shape: tuple[int, ...]) -> bool:
        """The piece is the whole parameter, as stored in memory."""
        return not self.transposed and self.index == tuple((0, size) for size in shape)


@dataclass
class _View:
    """A piece in the making: the parameter's coordinates it keeps, and its axes in order."""

    index: list[int | tuple[int, int]]
    axes: list[int]  # parameter dimension of each current axis

    def size(self, axis: int) -> int:
        start, stop = self.index[self.axes[axis]]  # type: ignore[misc]
        return stop - start


def whole_piece(name: str, shape: tuple[int, ...]) -> StoredPiece:
    return StoredPiece(name, tuple((0, size) for size in shape))


def _chunk(view: _View, axis: int, count: int) -> list[_View]:
    """torch.chunk semantics: pieces of ceil(size / count), the last one shorter."""
    dim = view.axes[axis]
    start, stop = view.index[dim]  # type: ignore[misc]
    step = -(-(stop - start) // count)
    pieces = []
    for low in range(start, stop, step):
        index = list(view.index)
        index[dim] = (low, min(stop, low + step))
        pieces.append(_View(index, list(view.axes)))
    return pieces


def _unstack(view: _View, axis: int) -> list[_View]:
    dim = view.axes[axis]
    start, stop = view.index[dim]  # type: ignore[misc]
    pieces = []
    for position in range(start, stop):
        index = list(view.index)
        index[dim] = position
        pieces.append(_View(index, [a for a in view.axes if a != dim]))
    return pieces


Views = dict[str, _View]


def _single(views: Views, name: str) -> _View:
    if len(views) != 1:
        raise UnmappedLayout(f"{name} of several tensors")
    return next(iter(views.values()))


def _chunk_op(operation: Any, views: Views, sources: list[str], targets: list[str], config: Any):
    """Chunk: one tensor cut into equal pieces along `dim`, one per target pattern."""
    view = _single(views, "Chunk")
    if operation.num_shards_attribute is not None:
        count = getattr(config.get_text_config(), operation.num_shards_attribute)
        targets = [targets[0].replace("*", str(i)) for i in range(count)]
    pieces = _chunk(view, operation.dim, len(targets))
    if len(pieces) != len(targets):
        raise UnmappedLayout(f"Chunk into {len(targets)} uneven pieces")
    return dict(zip(targets, pieces, strict=True))


def _split_op(operation: Any, views: Views, sources: list[str], targets: list[str], config: Any):
    """SplitModulelist: a stack unstacked along `dim`, `*` in the name numbering the pieces."""
    if len(views) == 1 and len(targets) != 1:
        raise UnmappedLayout("SplitModulelist into several patterns")
    result = {}
    for key, view in views.items():
        pattern = targets[0] if len(views) == 1 else key
        for position, piece in enumerate(_unstack(view, operation.dim)):
            result[pattern.replace("*", str(position))] = piece
    return result


def _transpose_op(
    operation: Any, views: Views, sources: list[str], targets: list[str], config: Any
):
    if operation.check_dims:
        raise UnmappedLayout("Transpose that depends on the stored shape")
    view = _single(views, "Transpose")
    axes = list(view.axes)
    axes[operation.dim0], axes[operation.dim1] = axes[operation.dim1], axes[operation.dim0]
    key = sources[0] if len(targets) > 1 and len(sources) == 1 else targets[0]
    return {key: replace(view, axes=axes)}


# the operations (as their reversed forms appear on saving) whose meaning is mapped here
_VIEW_OPERATIONS = {"Chunk": _chunk_op, "SplitModulelist": _split_op, "Transpose": _transpose_op}


def _apply(
    operation: Any, views: Views, sources: list[str], targets: list[str], config: Any
) -> Views:
    name = type(operation).__name__
    if name not in _VIEW_OPERATIONS:
        raise UnmappedLayout(name)
    return _VIEW_OPERATIONS[name](operation, views, sources, targets, config)


def _piece(name: str, view: _View) -> StoredPiece:
    kept = [d for d in range(len(view.index)) if isinstance(view.index[d], tuple)]
    if sorted(view.axes) != kept:
        raise UnmappedLayout("a reordering of dimensions")
    if view.axes == kept:
        transposed = False
    elif len(kept) == 2 and view.axes == kept[::-1]:
        transposed = True
    else:
        raise UnmappedLayout("a permutation of more than two dimensions")
    return StoredPiece(name, tuple(view.index), transposed)


@dataclass
class StoredLayout:
    """The reversed transforms of one model: in-memory parameter name -> stored pieces."""

    renamings: list[Any]
    converters: list[Any]
    config: Any

    def pieces(self, param: str, shape: tuple[int, ...]) -> list[StoredPiece]:
        """Where `param` (of in-memory `shape`) is stored; raises UnmappedLayout."""
        from transformers.core_model_loading import apply_converters, apply_renamings

        renamed, pattern = apply_converters(param, self.converters)
        if pattern is None:
            return [whole_piece(apply_renamings(param, self.renamings), shape)]
        converter = next(c for c in self.converters if pattern in c.source_patterns)
        views = {pattern: _View([(0, size) for size in shape], list(range(len(shape))))}
        sources, targets = list(converter.source_patterns), list(converter.target_patterns)
        for operation in converter.operations:
            views = _apply(operation, views, sources, targets, self.config)
        full = renamed.replace("*.", "0.") if "*." in renamed else renamed
        anchor = next((k for k in views if k in full), None)
        if anchor is None:
            raise UnmappedLayout("stored names that do not follow the in-memory name")
        prefix, _, suffix = full.partition(anchor)
        return [
            _piece(apply_renamings(prefix + key + suffix, self.renamings), view)
            for key, view in views.items()
        ]


def stored_layout(model: Any) -> StoredLayout | None:
    """The reversed conversion rules transformers applies when it saves `model` (None: names are
    stored as they are in memory)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        # as transformers does for a model it did not load: no legacy renames, no prefix changes
        conversions = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    if not conversions:
        return None
    reverse = [c.reverse_transform() for c in conversions[::-1]]
    return StoredLayout(
        renamings=[c for c in reverse if isinstance(c, WeightRenaming)],
        converters=[c for c in reverse if isinstance(c, WeightConverter)],
        config=model.config,
    )
