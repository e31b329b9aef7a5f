"""The training-time ResLoRA forward (residual paths kept), as forward hooks on a transformers
model's target linears (docs/rules.md section 4)."""

from __future__ import annotations

import torch

from loramerge.errors import LoramergeError
from loramerge.formats.reslora_checkpoint import ResLoraCheckpoint
from loramerge.model.lora_forward import Hooks
from loramerge.ops.reslora_rules import window


class ResLoraForward(Hooks):
    """The training-time forwards of docs/rules.md section 4 as hooks on the target linears.

    is: h_n += s B_n A_n (x_n + x_{n-1}) (x_{-1} := x_0); bs: h_n += s (sum_k B_{n-k} A_{n-k}) x_n;
    ms: h_n += s B_n (sum_k A_{n-k} x_{n-k}). Chains run in layer order within one model
    forward, so block n reads what block n-1 left in the same forward. With `record`, each
    block's input Frobenius norm and middle-vector norm ||A_n x_n||_F are summed per forward.
    """

    def __init__(self, model, checkpoint: ResLoraCheckpoint, record: bool = False) -> None:
        super().__init__(model)
        self.checkpoint = checkpoint
        self.record = record
        self.records: dict[str, list[float]] = {}
        self._seen: dict[tuple[int, int], torch.Tensor] = {}

    def _register(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._reset))
        for c, chain in enumerate(self.checkpoint.chains):
            factors = [block.factors(torch.float32) for block in chain.blocks]
            for n, block in enumerate(chain.blocks):
                hook = self._hook(c, n, block.path, factors)
                self._handles.append(self._module(block.path).register_forward_hook(hook))

    def _reset(self, *_: object) -> None:
        self._seen = {}

    def _previous(self, c: int, j: int, n: int) -> torch.Tensor:
        """What block j of chain c left in this forward, for its successor n."""
        try:
            return self._seen[(c, j)]
        except KeyError:
            blocks = self.checkpoint.chains[c].blocks
            raise LoramergeError(
                f"block {blocks[n].path} ran before its previous block {blocks[j].path} in one "
                "forward pass",
                hint="this model runs its layers in another order than the checkpoint's chains",
            ) from None

    def _hook(self, c: int, n: int, path: str, factors: list):
        config = self.checkpoint.config
        kind, scale, m = self.checkpoint.kind, config.scale, window(config.pre_num, n)
        B, A = factors[n]

        def hook(_layer, args, output):
            x = args[0]
            middle = x @ A.T
            if self.record:
                entry = self.records.setdefault(path, [0.0, 0.0, 0])
                entry[0] += float(torch.linalg.vector_norm(x.to(torch.float64)))
                entry[1] += float(torch.linalg.vector_norm(middle.to(torch.float64)))
                entry[2] += 1
            if kind == "is":
                self._seen[(c, n)] = x
                previous = x if n == 0 else self._previous(c, n - 1, n)
                term = (middle + previous @ A.T) @ B.T
            elif kind == "bs":
                term = middle @ B.T
                for k in range(1, m + 1):
                    Bk, Ak = factors[n - k]
                    term = term + (x @ Ak.T) @ Bk.T
            elif kind == "ms":
                self._seen[(c, n)] = middle
                total = middle
                for k in range(1, m + 1):
                    total = total + self._previous(c, n - k, n)
                term = total @ B.T
            else:
                term = middle @ B.T
            return output + term * scale

        return hook
