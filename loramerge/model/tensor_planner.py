"""Each tensor the base's files store, given its merge action: what the adapter changes in the
in-memory parameter it holds (a ChangeSet), mapped onto the stored piece."""

from __future__ import annotations

import math
from typing import Any

from loramerge.adapter import ModuleKind
from loramerge.errors import FormatError, ShapeMismatchError
from loramerge.io.dtypes import FLOAT_CODES
from loramerge.io.safetensors_header import TensorEntry
from loramerge.model.dense_fit import check_dense_bias, matrix_shape
from loramerge.model.fit import Fitted, Target
from loramerge.model.folder import BaseModel
from loramerge.model.param_changes import ChangeSet, ParamChange
from loramerge.model.plan import Action, TensorPlan, UpdateSlice
from loramerge.model.shapes import check_bias, check_full_copy
from loramerge.model.stored_layout import StoredPiece, UnmappedLayout
from loramerge.model.stored_tensors import StoredTensors


def update_slice(target: Target, piece: StoredPiece, rank_shape: tuple[int, int]) -> UpdateSlice:
    """Where the stored tensor `piece` sits in the update's product (out x in)."""
    out_features, in_features = rank_shape
    if target.kind is not ModuleKind.PARAMETER:
        if not piece.is_whole(target.shape):
            raise UnmappedLayout(f"a {target.kind.value} weight stored in pieces")
        transposed = target.kind in (ModuleKind.CONV1D, ModuleKind.EMBEDDING)
        row_shape = tuple(target.shape[1:]) if target.kind is ModuleKind.CONV else ()
        return UpdateSlice(None, (0, out_features), (0, in_features), transposed, row_shape)
    index = piece.index
    expert, stacked = None, 0
    if len(target.shape) == 3:
        if isinstance(index[0], int):
            expert = index[0]
        elif index[0] == (0, target.shape[0]) and not piece.transposed:
            stacked = target.shape[0]
        else:
            raise UnmappedLayout("a part of a stack of experts")
        index = index[1:]
    first, second = index
    assert isinstance(first, tuple) and isinstance(second, tuple)
    held_transposed = target.experts_transposed and len(target.shape) == 3
    rows, columns = (second, first) if held_transposed else (first, second)
    transposed = held_transposed != piece.transposed
    return UpdateSlice(expert, rows, columns, transposed, stacked=stacked)


class TensorPlanner:
    """Stored tensor -> TensorPlan, in the base's order, with untied heads added."""

    def __init__(
        self, stored: StoredTensors, changes: ChangeSet, fitted: Fitted, dtype: str | None
    ) -> None:
        self.stored = stored
        self.changes = changes
        self.adapter = fitted.adapter
        self.dtype = dtype
        self.vocab: int | None = None
        self.by_file: dict[str, tuple[str, StoredPiece]] = {}
        self.added: dict[str, list[tuple[str, StoredPiece, str]]] = {}
        self._index()

    def _index(self) -> None:
        tied = self.changes.tied
        for param, change in self.changes.changes.items():
            if not change.touched() or (param in tied and not self._held(param)):
                continue  # a tied member the files do not hold: written only when untied
            for name, piece in self.stored.located(param):
                self.by_file[name] = (param, piece)
        if not self.changes.untie:
            return
        # every tied member the files do not hold is written after the tensor it copies
        for target, source in tied.items():
            if self._held(target):
                for name, piece in self.stored.located(target):
                    self.by_file.setdefault(name, (target, piece))
                continue
            located = self.stored.located(source)
            if len(located) != 1:
                raise FormatError(f"tied parameter {source} is stored in pieces")
            source_file, _ = located[0]
            self.by_file.setdefault(source_file, (source, located[0][1]))
            for piece in self.stored.pieces(target):
                name = self._new_name(piece.name, source_file)
                self.added.setdefault(source_file, []).append((target, piece, name))

    def _held(self, param: str) -> bool:
        return all(self.stored.file_name(p.name) is not None for p in self.stored.pieces(param))

    def _new_name(self, name: str, beside: str) -> str:
        """A written name follows the files' convention for the base-model prefix."""
        prefix = self.stored.prefix + "." if self.stored.prefix else ""
        if prefix and name.startswith(prefix) and not beside.startswith(prefix):
            return name[len(prefix) :]
        return name

    def shards(self, base: BaseModel) -> dict[str, list[TensorPlan]]:
        shards: dict[str, list[TensorPlan]] = {}
        for shard, entry in base.tensors():
            plans = shards.setdefault(shard, [])
            plans.append(self._plan(entry.name, entry, self.by_file.get(entry.name)))
            for param, piece, name in self.added.get(entry.name, []):
                plans.append(self._plan(name, entry, (param, piece)))
        return shards

    def _out_dtype(self, code: str) -> str:
        return code if self.dtype is None or code not in FLOAT_CODES else self.dtype

    def _plan(
        self, name: str, entry: TensorEntry, found: tuple[str, StoredPiece] | None
    ) -> TensorPlan:
        code = self._out_dtype(entry.dtype)
        if found is None:
            action = Action.COPY if code == entry.dtype else Action.CAST
            return TensorPlan(name, code, entry.shape, action, source=entry.name)
        param, piece = found
        change = self.changes.changes.get(param, ParamChange())
        full = self._full_tensor(change, param, piece, entry)
        if change.replacement is not None:
            shape = tuple(full.shape)
            return TensorPlan(name, code, shape, Action.REPLACE, adapter_tensor=change.replacement)
        self._require_float(entry, change)
        table = change.table
        shape = tuple(full.shape) if full is not None else tuple(entry.shape)
        common = {"source": entry.name, "adapter_tensor": table, "token_rows": change.rows}
        if change.update is not None or change.dense is not None:
            return self._merge_plan(name, code, shape, param, piece, change, common)
        if change.dense_bias is not None:
            update_ = self.adapter.dense_updates[change.dense_bias]
            check_dense_bias(update_, tuple(entry.shape), self.adapter.source_path)
            return TensorPlan(
                name, code, shape, Action.BIAS, module=change.dense_bias, dense=True, **common
            )
        if change.lora_bias is not None:
            module = self.adapter.modules[change.lora_bias]
            check_bias(module, tuple(entry.shape), self.adapter.source_path)
            return TensorPlan(name, code, shape, Action.BIAS, module=change.lora_bias, **common)
        if change.rows is not None:
            return TensorPlan(name, code, shape, Action.ROWS, **common)
        if table is not None:
            return TensorPlan(name, code, shape, Action.REPLACE, adapter_tensor=table)
        action = Action.COPY if code == entry.dtype else Action.CAST
        return TensorPlan(name, code, shape, action, source=entry.name)

    def _merge_plan(
        self,
        name: str,
        code: str,
        shape: tuple[int, ...],
        param: str,
        piece: StoredPiece,
        change: ParamChange,
        common: dict[str, Any],
    ) -> TensorPlan:
        """A MERGE plan: a module's low-rank update, or a dense update's rule."""
        target = change.update or change.dense
        assert target is not None
        if change.dense is not None:
            product = matrix_shape(target.kind, target.shape)
        else:
            module = self.adapter.modules[target.module]
            product = (module.lora_B.shape[0], math.prod(module.lora_A.shape[1:]))
        try:
            update = update_slice(target, piece, product)
        except UnmappedLayout as exc:
            raise FormatError(
                f"transformers stores {param} as {exc}, which loramerge does not map",
                file=self.adapter.source_path,
                module=target.module,
            ) from None
        if change.update is not None:
            self._check_dora(module, update, name)
        return TensorPlan(
            name, code, shape, Action.MERGE, module=target.module, kind=target.kind,
            update=update, dense=change.dense is not None, **common,
        )  # fmt: skip

    def _full_tensor(self, change: ParamChange, param: str, piece: StoredPiece, entry: TensorEntry):
        """The adapter's full tensor that stands for this parameter, checked against the base."""
        key, carried = None, None
        if change.replacement is not None:
            key = change.replacement
            carried = getattr(self.adapter, change.replacement_source)[key]
        elif change.table is not None:
            key, carried = change.table, self.adapter.base_tables[change.table]
        if carried is None:
            return None
        if not piece.is_whole(self.stored.shape(param)):
            raise FormatError(
                f"carries a full copy of {param}, which the base stores in pieces",
                file=self.adapter.source_path,
                module=key,
            )
        where = self.adapter.source_path
        check_full_copy(entry.name, tuple(entry.shape), tuple(carried.shape), where, key)
        if tuple(carried.shape) != tuple(entry.shape) and len(entry.shape) == 2:
            self.vocab = carried.shape[0]
        return carried

    def _require_float(self, entry: TensorEntry, change: ParamChange) -> None:
        changes = (change.update, change.lora_bias, change.rows, change.dense, change.dense_bias)
        if entry.dtype not in FLOAT_CODES and any(changes):
            raise FormatError(
                f"base tensor {entry.name} is stored as {entry.dtype}; loramerge merges into "
                "float16, bfloat16 or float32 weights",
                file=self.adapter.source_path,
                hint="dequantize the base model first",
            )

    def _check_dora(self, module: Any, update: UpdateSlice, name: str) -> None:
        if module.magnitude is None:
            return
        outputs = update.rows[1] - update.rows[0]
        if math.prod(module.magnitude.shape) != outputs or update.expert is not None:
            raise ShapeMismatchError(
                f"DoRA magnitude has {list(module.magnitude.shape)} entries, the layer has "
                f"{outputs} outputs",
                file=self.adapter.source_path,
                module=module.path,
            )
