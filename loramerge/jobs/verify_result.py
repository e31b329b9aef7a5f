"""What `verify` compares and what it reports: the sides it reads (an adapter, or a merged model
folder) and the differences it found, each against atol + rtol x the source's norm."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter
from loramerge.adapter_checks import read_checked, refuse_dense_updates
from loramerge.errors import MismatchError
from loramerge.formats.registry import ReadOptions


@dataclass(frozen=True)
class Difference:
    """One compared quantity: a module's update, DoRA magnitude, LoRA bias or a full tensor.

    `source_norm` is the Frobenius norm of the source's quantity and `diff_norm` that of the
    difference (candidate minus source); both in float64.
    """

    name: str
    source_norm: float
    diff_norm: float

    @property
    def relative(self) -> float:
        if self.source_norm > 0:
            return self.diff_norm / self.source_norm
        return 0.0 if self.diff_norm == 0 else math.inf

    def excess(self, atol: float, rtol: float) -> float:
        """diff / tolerance: above 1 fails."""
        allowed = atol + rtol * self.source_norm
        if allowed > 0:
            return self.diff_norm / allowed
        return 0.0 if self.diff_norm == 0 else math.inf


@dataclass
class VerifyResult:
    mode: str  # "factors", "weights" or "logits"
    atol: float
    rtol: float
    differences: list[Difference] = field(default_factory=list)
    logits: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> Difference | None:
        if not self.differences:
            return None
        return max(self.differences, key=lambda d: (d.excess(self.atol, self.rtol), d.relative))

    @property
    def passed(self) -> bool:
        worst = self.worst
        return worst is None or worst.excess(self.atol, self.rtol) <= 1.0

    def failure(self, source: str | Path, candidate: str | Path) -> MismatchError | None:
        """The error that says where the candidate differs most, or None when it passed."""
        worst = self.worst
        if self.passed or worst is None:
            return None
        allowed = self.atol + self.rtol * worst.source_norm
        return MismatchError(
            f"differs from {source}: {worst.name}: difference {worst.diff_norm:.3e} (relative "
            f"{worst.relative:.3e}) > tolerance {allowed:.3e} (atol {self.atol:g} + rtol "
            f"{self.rtol:g} x {worst.source_norm:.3e})",
            file=candidate,
        )

    def to_json(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "passed": self.passed,
            "mode": self.mode,
            "atol": self.atol,
            "rtol": self.rtol,
            "worst": None if worst is None else row(worst),
            "compared": len(self.differences),
            "modules": [row(d) for d in self.differences],
            "logits": self.logits,
            "notes": self.notes,
        }


def row(diff: Difference) -> dict[str, Any]:
    return {
        "name": diff.name,
        "source_norm": diff.source_norm,
        "diff_norm": diff.diff_norm,
        "relative": diff.relative,
    }


def is_model_folder(path: Path) -> bool:
    """A Hugging Face model folder (config.json and weights, no adapter config)."""
    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and not (path / "adapter_config.json").exists()
        and any(path.glob("*.safetensors"))
    )


def read_side(
    path: Path, base_config: Mapping[str, Any] | None, base: str | Path | None = None
) -> Adapter:
    """Any adapter format loramerge reads (GGUF with the base config when it needs it; VeRA,
    MiSS and torchtune with the base), refused like every other command refuses it: empty, or
    NaN / Inf values."""
    adapter = read_checked(path, options=ReadOptions(base_config=base_config, base=base))
    refuse_dense_updates(
        adapter, "verify", "merge it (`loramerge merge`) and compare the merged model's logits"
    )
    return adapter
