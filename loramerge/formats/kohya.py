"""kohya / sd-scripts LoRA files: one `.safetensors`, `lora_down`/`lora_up`/`alpha` per module."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from loramerge import __version__
from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind
from loramerge.errors import FormatError, opt
from loramerge.formats.common import lazy_safetensors
from loramerge.io.safetensors_header import read_header
from loramerge.io.safetensors_writer import save_tensors

PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_")
DEFAULT_PREFIX = "lora_te_"
_KEY = re.compile(
    r"^(?P<name>lora_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
# Underscored words that are single components of common module paths; the rest of a kohya name
# splits at every underscore. Exact names come from the base model when one is given.
_COMPOUNDS = (
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "out_proj",
    "qkv_proj",
    "gate_up_proj",
    "embed_tokens",
    "lm_head",
    "c_attn",
    "c_proj",
    "c_fc",
    "text_model",
    "input_layernorm",
    "post_attention_layernorm",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "query_key_value",
    "word_embeddings",
    "transformer_blocks",
    "down_blocks",
    "up_blocks",
    "mid_block",
    "proj_in",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "ff_net",
    "time_emb_proj",
    "conv_shortcut",
    "block_sparse_moe",
    "shared_expert",
)


def sniff(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors" and _looks_kohya(path, dylora=False)


def _looks_kohya(path: Path, dylora: bool) -> bool:
    try:
        header = read_header(path)
    except FormatError:
        return False
    if not any(_KEY.match(name) for name in header.entries):
        return False
    is_dylora = header.metadata.get("ss_network_module") == "networks.dylora"
    return is_dylora == dylora


def strip_prefix(name: str) -> tuple[str, str]:
    """(prefix, rest) of a kohya module name."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return prefix, name[len(prefix) :]
    return "", name


def kohya_to_path(name: str) -> str:
    """A best guess of the dotted module path; merges re-resolve it against the base's names."""
    _, rest = strip_prefix(name)
    protected = rest
    for index, word in enumerate(sorted(_COMPOUNDS, key=len, reverse=True)):
        protected = re.sub(rf"(?<![A-Za-z0-9]){word}(?![A-Za-z])", f"\0{index}\0", protected)
    dotted = protected.replace("_", ".")
    ordered = sorted(_COMPOUNDS, key=len, reverse=True)
    return re.sub(r"\x00(\d+)\x00", lambda m: ordered[int(m.group(1))], dotted)


def path_to_kohya(path: str, prefix: str = DEFAULT_PREFIX) -> str:
    return prefix + path.replace(".", "_")


def read(path: Path) -> Adapter:
    tensors, metadata = lazy_safetensors(path)
    grouped: dict[str, dict[str, LazyTensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            if key.endswith((".dora_scale", ".hada_w1_a", ".lokr_w1", ".oft_blocks")):
                raise FormatError(
                    f"tensor {key!r} belongs to a LyCORIS method, not plain LoRA", file=path
                )
            continue
        grouped.setdefault(match["name"], {})[match["part"]] = tensor
    if not grouped:
        raise FormatError("holds no kohya LoRA tensors", file=path)
    modules = {}
    for name, parts in grouped.items():
        module = _module(path, name, parts)
        modules[module.path] = module
    base_model = metadata.get("ss_base_model_version") or metadata.get("ss_sd_model_name")
    return Adapter(
        modules=modules,
        base_model=base_model,
        source_format="kohya",
        source_path=str(path),
        metadata=dict(metadata),
    )


def _module(path: Path, name: str, parts: dict[str, LazyTensor]) -> LoraModule:
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None:
        missing = "lora_down" if down is None else "lora_up"
        raise FormatError(f"has no {missing} tensor", file=path, module=name)
    r = down.shape[0] if down.shape else 0
    if (
        len(down.shape) not in (2, 4)
        or len(up.shape) != len(down.shape)
        or up.shape[1] != r
        or r == 0
    ):
        raise FormatError(
            f"lora_down {list(down.shape)} and lora_up {list(up.shape)} are not LoRA factors",
            file=path,
            module=name,
        )
    alpha = float(r)
    if "alpha" in parts:
        if math.prod(parts["alpha"].shape) != 1:
            raise FormatError(
                f"alpha must hold one number, it has shape {list(parts['alpha'].shape)}",
                file=path,
                module=name,
            )
        alpha = float(parts["alpha"].load().reshape(-1)[0].item())
    if not (math.isfinite(alpha) and alpha > 0):
        raise FormatError(f"alpha must be a positive number, got {alpha}", file=path, module=name)
    kind = ModuleKind.CONV if len(down.shape) == 4 else ModuleKind.LINEAR
    return LoraModule(path=kohya_to_path(name), lora_A=down, lora_B=up, alpha=alpha, kind=kind)


def tensors_for(adapter: Adapter, prefix: str) -> dict[str, object]:
    unmappable = [
        m.path
        for m in adapter.modules.values()
        if m.magnitude is not None or m.bias is not None or m.kind is ModuleKind.EMBEDDING
    ]
    if unmappable or adapter.modules_to_save:
        what = unmappable[0] if unmappable else next(iter(adapter.modules_to_save))
        raise FormatError(
            f"kohya LoRA files cannot hold DoRA, LoRA bias, embedding LoRA or modules_to_save "
            f"({len(unmappable) + len(adapter.modules_to_save)} such entries, e.g. {what})",
            file=adapter.source_path,
            hint=f"write a PEFT adapter instead ({opt('to')} peft)",
        )
    import torch

    tensors: dict[str, object] = {}
    for module in adapter.modules.values():
        name = path_to_kohya(module.path, prefix)
        # kohya always scales by alpha / r: express rsLoRA's alpha / sqrt(r) through alpha
        alpha = module.scale * module.r
        tensors[f"{name}.lora_down.weight"] = module.lora_A.load().contiguous()
        tensors[f"{name}.lora_up.weight"] = module.lora_B.load().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def metadata_for(adapter: Adapter) -> dict[str, str]:
    modules = list(adapter.modules.values())
    metadata = {k: v for k, v in adapter.metadata.items() if k.startswith("ss_")}
    ranks = sorted({m.r for m in modules})
    metadata.setdefault("ss_network_module", "networks.lora")
    metadata.setdefault("ss_network_args", json.dumps({}))
    metadata["ss_network_dim"] = str(ranks[-1] if ranks else 0)
    alphas = {m.scale * m.r for m in modules}
    if len(alphas) == 1:
        metadata["ss_network_alpha"] = str(float(alphas.pop()))
    if adapter.base_model and "ss_base_model_version" not in metadata:
        metadata["ss_base_model_version"] = adapter.base_model
    metadata["format"] = "pt"
    metadata["loramerge.version"] = __version__
    return metadata


def write(adapter: Adapter, path: Path, prefix: str | None = None) -> None:
    """Write a kohya file at `path` (a temporary file beside the final output)."""
    if prefix is None:
        prefix = _source_prefix(adapter) or DEFAULT_PREFIX
    save_tensors(path, tensors_for(adapter, prefix), metadata_for(adapter))


def _source_prefix(adapter: Adapter) -> str | None:
    if adapter.source_format.startswith("kohya") and adapter.source_path:
        try:
            header = read_header(Path(adapter.source_path))
        except FormatError:
            return None
        for key in header.entries:
            prefix, _ = strip_prefix(key)
            if prefix:
                return prefix
    return None
