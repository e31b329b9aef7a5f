"""Which plans the torch-free engine (loramerge.model.fast_stream) writes: untouched tensors and
plain LoRA updates of whole linear weights stored in bfloat16 or float32; anything else takes
the torch engine."""

from __future__ import annotations

from loramerge.adapter import Adapter, ModuleKind
from loramerge.model.folder import BaseModel
from loramerge.model.plan import Action, MergePlan, TensorPlan
from loramerge.ops import bits


def unsupported(plan: MergePlan, base: BaseModel) -> str | None:
    """Why this engine cannot write the plan, or None when it can."""
    located = base.locate()
    for shard in plan.shards:
        for tensor in shard.tensors:
            if tensor.action is Action.COPY and tensor.source in located:
                continue
            if tensor.action is not Action.MERGE:
                return f"a tensor to {tensor.action.value}"
            reason = _merge_unsupported(tensor, plan.adapter, located)
            if reason is not None:
                return f"{tensor.name}: {reason}"
    return None


def _merge_unsupported(tensor: TensorPlan, adapter: Adapter, located: dict) -> str | None:
    update, module = tensor.update, adapter.modules.get(tensor.module or "")
    if update is None or module is None or tensor.source not in located:
        return "no update"
    if tensor.adapter_tensor is not None or tensor.token_rows is not None:
        return "adapter tables"
    if module.kind is not ModuleKind.LINEAR or module.experts != 1:
        return f"a {module.kind.value} module"
    if module.magnitude is not None:
        return "DoRA"
    if update.transposed or update.stacked or update.expert is not None or update.row_shape:
        return "a transposed or stacked layout"
    if located[tensor.source][1].dtype != tensor.dtype or tensor.dtype not in bits.ROUNDED:
        return f"dtype {tensor.dtype}"
    if len(tensor.shape) != 2:
        return "not a matrix"
    out_features, in_features = tensor.shape
    whole = update.rows == (0, out_features) and update.columns == (0, in_features)
    shapes = (module.lora_B.shape, module.lora_A.shape)
    if not whole or shapes != ((out_features, module.r), (module.r, in_features)):
        return "a part of the update"
    return None
