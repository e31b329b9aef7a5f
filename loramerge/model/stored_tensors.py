"""In-memory parameters of a fitted adapter's base -> the tensors its files hold."""

from __future__ import annotations

from loramerge.errors import FormatError
from loramerge.model.fit import Fitted
from loramerge.model.folder import BaseModel
from loramerge.model.stored_layout import StoredPiece, UnmappedLayout, whole_piece


class StoredTensors:
    """In-memory parameters -> tensors in the base's files."""

    def __init__(self, base: BaseModel, fitted: Fitted) -> None:
        self.entries = {entry.name: entry for _, entry in base.tensors()}
        self.fitted = fitted
        self.architecture = fitted.architecture
        self.prefix = fitted.prefix
        self.adapter = fitted.adapter

    def file_name(self, name: str) -> str | None:
        """The files' name for a stored name, the base-model prefix added or dropped as
        transformers does when it loads."""
        if name in self.entries:
            return name
        prefix = self.prefix + "." if self.prefix else ""
        if prefix and name.startswith(prefix) and name[len(prefix) :] in self.entries:
            return name[len(prefix) :]
        if prefix and prefix + name in self.entries:
            return prefix + name
        return None

    def pieces(self, param: str) -> list[StoredPiece]:
        if self.architecture is None:
            return [whole_piece(param, self.fitted.param_shapes[param])]
        try:
            return self.architecture.stored_pieces(param)
        except UnmappedLayout as exc:
            raise FormatError(
                f"transformers stores {param} through {exc}, which loramerge does not map",
                file=self.adapter.source_path,
                hint="merge an adapter that does not change this parameter",
            ) from None

    def located(self, param: str) -> list[tuple[str, StoredPiece]]:
        """(file name, piece) for a parameter the files hold."""
        found = []
        for piece in self.pieces(param):
            name = self.file_name(piece.name)
            if name is None:
                raise FormatError(
                    f"the base's files have no tensor {piece.name} (parameter {param})",
                    file=self.adapter.source_path,
                    hint="is the base folder complete, and the right model for this adapter?",
                )
            found.append((name, piece))
        return found

    def shape(self, param: str) -> tuple[int, ...]:
        return self.fitted.param_shapes[param]

    def whole_tensor(self, param: str) -> str:
        """The one file tensor that holds all of `param` as it is in memory."""
        located = self.located(param)
        name, piece = located[0]
        if len(located) != 1 or not piece.is_whole(self.shape(param)):
            raise FormatError(
                f"the base stores {param} in pieces; this needs it whole",
                file=self.adapter.source_path,
            )
        return name
