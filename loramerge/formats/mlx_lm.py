"""mlx-lm adapter folders: `adapters.safetensors` + `adapter_config.json`, read here and written
by loramerge.formats.mlx_lm_writer.

What mlx-lm 0.32 writes (fixtures/mlx-lm, checked against its forward and its fuse):
- keys `<module path>.lora_a` (in x r), `.lora_b` (r x out), DoRA `.m` (out); the module paths
  are the model's (for Llama those of the Hugging Face checkpoint, `lm_head` included);
- `adapter_config.json` holds every training option: `fine_tune_type` (lora, dora or full),
  `num_layers` (adapt the last N blocks; -1: all), `lora_parameters` {rank, scale, dropout,
  keys?}. `scale` is the multiplier itself: W' = W + scale * lora_b^T lora_a^T, so in PEFT
  terms A = lora_a^T, B = lora_b^T and lora_alpha = scale * rank. `keys` name modules relative
  to a block (`self_attn.q_proj`) and are also matched against whole paths (`lm_head`).
- DoRA: V = W + scale lora_b^T lora_a^T, W' = (m / ||V||_row) V, bias added after, unscaled:
  the same rule as PEFT's DoRA.
- Embedding LoRA (`lora_a` num x r, `lora_b` r x dims, table += scale lora_a lora_b) has the
  same transposition rule; mlx-lm's MoE `LoRASwitchLinear` (3-D factors) is not read.

"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind
from loramerge.errors import FormatError
from loramerge.formats import provenance
from loramerge.formats.common import lazy_safetensors, require_positive, require_rank
from loramerge.formats.derived import transposed
from loramerge.io.json_files import read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
FORMAT = "mlx-lm"
_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_a|lora_b|m)$")
# module names that mlx-lm turns into LoRAEmbedding (an nn.Embedding in the model)
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")
_BLOCK = re.compile(r"^(?P<stack>.+?)\.(?P<index>\d+)\.(?P<rel>.+)$")


def is_mlx_config(data: Any) -> bool:
    """An mlx-lm adapter_config.json: training options with `lora_parameters`, no peft_type."""
    return isinstance(data, dict) and "lora_parameters" in data and "peft_type" not in data


def _folder_and_weights(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        return path, path / WEIGHTS_NAME
    return path.parent, path


def _has_mlx_keys(weights: Path) -> bool:
    from loramerge.io.safetensors_header import read_header

    try:
        names = list(read_header(weights).entries)
    except FormatError:
        return False
    return bool(names) and all(_KEY.match(n) for n in names)


def sniff(path: Path) -> bool:
    """A folder (or its adapters.safetensors) with an mlx-lm config, or mlx-lm's tensor names
    in adapters.safetensors beside any adapter_config.json."""
    folder, weights = _folder_and_weights(path)
    if path.is_file() and not path.name.endswith(WEIGHTS_NAME):
        return False
    config = folder / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if is_mlx_config(data):
        return True
    return weights.is_file() and _has_mlx_keys(weights)


def read(path: Path) -> Adapter:
    folder, weights = _folder_and_weights(path)
    config_path = folder / CONFIG_NAME
    config = read_json(config_path)
    rank, scale, keys, dora = _settings(config, config_path)
    if not weights.is_file():
        raise FormatError(
            f"has {CONFIG_NAME} but no {WEIGHTS_NAME}",
            file=folder,
            hint="copy the adapter's weight file into the folder",
        )
    tensors, metadata = lazy_safetensors(weights)
    parts: dict[str, dict[str, LazyTensor]] = {}
    for name, tensor in tensors.items():
        found = _KEY.match(name)
        if found is None:
            raise FormatError(
                f"holds tensor {name!r}, which is not an mlx-lm LoRA parameter "
                "(<module>.lora_a, .lora_b, .m)",
                file=weights,
            )
        parts.setdefault(found["path"], {})[found["part"]] = tensor
    if not parts:
        raise FormatError("holds no LoRA tensors", file=weights)
    modules = {}
    for module_path, found in parts.items():
        _check_keys(module_path, keys, config_path)
        modules[module_path] = _module(weights, module_path, found, rank, scale, dora)
    model = config.get("model")
    return Adapter(
        modules=modules,
        base_model=model if isinstance(model, str) else None,
        source_format=FORMAT,
        source_path=str(path),
        metadata=provenance.stamp(
            metadata,
            "mlx-lm",
            "DoRA" if dora else "LoRA",
            "A = lora_a^T, B = lora_b^T; lora_parameters.scale is the multiplier "
            f"({scale:g}; PEFT lora_alpha = scale * rank)" + ("; DoRA magnitude m" if dora else ""),
        ),
    )


def _settings(config: dict[str, Any], config_path: Path) -> tuple[int, float, Any, bool]:
    """(rank, scale, keys, dora) from mlx-lm's adapter_config.json."""
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type == "full":
        raise FormatError(
            "fine_tune_type is full: the file holds whole trained weights, not an adapter",
            file=config_path,
        )
    if fine_tune_type not in ("lora", "dora"):
        raise FormatError(
            f"fine_tune_type must be lora, dora or full, got {fine_tune_type!r}", file=config_path
        )
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise FormatError("has no lora_parameters object", file=config_path)
    if "scale" not in params:
        hint = "mlx-lm's lora_parameters give `scale`, the multiplier itself"
        raise FormatError("lora_parameters has no scale", file=config_path, hint=hint)
    rank = require_rank(params.get("rank"), "lora_parameters.rank", config_path)
    scale = require_positive(params.get("scale"), "lora_parameters.scale", config_path)
    keys = params.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise FormatError("lora_parameters.keys must be a list of names", file=config_path)
    return rank, scale, keys, fine_tune_type == "dora"


def _check_keys(module_path: str, keys: list[str] | None, config_path: Path) -> None:
    """mlx-lm adapts a module when `keys` names it relative to its block or by its whole path."""
    if keys is None:
        return
    block = _BLOCK.match(module_path)
    if module_path in keys or (block is not None and block["rel"] in keys):
        return
    raise FormatError(
        f"module {module_path} is not named by lora_parameters.keys {keys}: mlx-lm would refuse "
        "its tensors",
        file=config_path,
    )


def _module(
    weights: Path,
    path: str,
    found: dict[str, LazyTensor],
    rank: int,
    scale: float,
    dora: bool,
) -> LoraModule:
    lora_a, lora_b = found.get("lora_a"), found.get("lora_b")
    if lora_a is None or lora_b is None:
        missing = "lora_a" if lora_a is None else "lora_b"
        raise FormatError(f"has no {missing} tensor", file=weights, module=path)
    if len(lora_a.shape) == 3 or len(lora_b.shape) == 3:
        raise FormatError(
            "holds 3-D factors of mlx-lm's LoRASwitchLinear (mixture-of-experts), which "
            "loramerge does not read",
            file=weights,
            module=path,
        )
    if (
        len(lora_a.shape) != 2
        or len(lora_b.shape) != 2
        or lora_a.shape[1] != lora_b.shape[0]
        or lora_a.shape[1] == 0
    ):
        raise FormatError(
            f"lora_a {list(lora_a.shape)} (in x r) and lora_b {list(lora_b.shape)} (r x out) "
            "are not LoRA factors",
            file=weights,
            module=path,
        )
    r = lora_a.shape[1]
    if r != rank:
        raise FormatError(
            f"lora_parameters.rank is {rank} but the tensors have rank {r}",
            file=weights,
            module=path,
        )
    magnitude = _magnitude(weights, path, found.get("m"), lora_b.shape[1], dora)
    embedding = path.rsplit(".", 1)[-1] in EMBEDDING_NAMES
    if embedding and magnitude is not None:
        raise FormatError("DoRA on an embedding is not read", file=weights, module=path)
    return LoraModule(
        path=path,
        lora_A=transposed(lora_a),
        lora_B=transposed(lora_b),
        alpha=scale * r,
        kind=ModuleKind.EMBEDDING if embedding else ModuleKind.LINEAR,
        magnitude=magnitude,
    )


def _magnitude(
    weights: Path, path: str, magnitude: LazyTensor | None, out: int, dora: bool
) -> LazyTensor | None:
    """The module's DoRA magnitude m, present exactly when the config says DoRA."""
    if dora and magnitude is None:
        raise FormatError(
            "has no DoRA magnitude m (fine_tune_type dora)", file=weights, module=path
        )
    if magnitude is not None:
        if not dora:
            raise FormatError(
                "holds a DoRA magnitude m but fine_tune_type is lora", file=weights, module=path
            )
        if tuple(magnitude.shape) != (out,):
            raise FormatError(
                f"DoRA magnitude m is {list(magnitude.shape)}, expected [{out}]",
                file=weights,
                module=path,
            )
    return magnitude


# ---------------------------------------------------------------- writing
