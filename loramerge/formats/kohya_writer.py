"""Writing kohya files: module names, the lora_down / lora_up / alpha tensors and `ss_*`
metadata."""

from __future__ import annotations

import json
from pathlib import Path

from loramerge import __version__
from loramerge.adapter import Adapter, ModuleKind
from loramerge.errors import FormatError, opt
from loramerge.formats import sd_names
from loramerge.formats.kohya_detect import header_of
from loramerge.formats.kohya_names import DEFAULT_PREFIX, NAMES_KEY, path_to_kohya, strip_prefix
from loramerge.io.safetensors_writer import save_tensors


def output_names(adapter: Adapter, prefix: str) -> dict[str, str]:
    """The kohya module name of every module: the source file's own name where the adapter was
    read from one (round trips keep every key), else the component's prefix and the path with
    '_' for '.'; modules of no known component take `prefix`."""
    try:
        sources = json.loads(adapter.metadata.get(NAMES_KEY, "{}"))
    except json.JSONDecodeError:
        sources = {}
    modules = adapter.modules.values()
    numbered = any(m.component in ("text_encoder_2", "text_encoder_3") for m in modules) or any(
        str(name).startswith("lora_te1_") for name in sources.values()
    )
    names: dict[str, str] = {}
    for key, module in adapter.modules.items():
        name = sources.get(f"{module.component}.{module.path}")
        if not isinstance(name, str):
            if module.component is None:
                name = path_to_kohya(module.path, prefix)
            else:
                stem = sd_names.kohya_prefix(module.component, numbered)
                if stem is None:
                    raise FormatError(
                        f"kohya files have no prefix for the component {module.component!r}",
                        file=adapter.source_path,
                        module=module.path,
                        hint="write a diffusers or PEFT adapter instead",
                    )
                name = f"{stem}_{sd_names.kohya_body(module.component, module.path)}"
        names[key] = name
    clashes = [n for n in set(names.values()) if list(names.values()).count(n) > 1]
    if clashes:
        raise FormatError(
            f"two modules would share the kohya name {sorted(clashes)[0]}",
            file=adapter.source_path,
            hint="kohya names lose the dots of module paths; write a PEFT adapter instead",
        )
    return names


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

    names = output_names(adapter, prefix)
    tensors: dict[str, object] = {}
    for key, module in adapter.modules.items():
        name = names[key]
        # kohya always scales by alpha / r: express rsLoRA's alpha / sqrt(r) through alpha
        alpha = module.scale * module.r
        tensors[f"{name}.lora_down.weight"] = module.lora_A.load().contiguous()
        tensors[f"{name}.lora_up.weight"] = module.lora_B.load().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def metadata_for(adapter: Adapter) -> dict[str, str]:
    modules = list(adapter.modules.values())
    metadata = {k: v for k, v in adapter.metadata.items() if k.startswith("ss_")}
    if metadata.get("ss_network_module", "").startswith("lycoris") and (
        adapter.metadata.get(LYCORIS_AS_KOHYA_KEY) != "true"
    ):
        # written as plain LoRA: the LyCORIS algorithm and its arguments no longer describe it
        metadata["ss_network_module"] = "networks.lora"
        metadata["ss_network_args"] = json.dumps({})
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


# Adapter.metadata: "true" when a LyCORIS file was plain LoCon, so its ss_* metadata still
# describes the kohya file written from it
LYCORIS_AS_KOHYA_KEY = "loramerge.lycoris_is_plain_locon"


def write(adapter: Adapter, path: Path, prefix: str | None = None) -> None:
    """Write a kohya file at `path` (a temporary file beside the final output)."""
    if prefix is None:
        prefix = _source_prefix(adapter) or DEFAULT_PREFIX
    save_tensors(path, tensors_for(adapter, prefix), metadata_for(adapter))


def _source_prefix(adapter: Adapter) -> str | None:
    if adapter.source_format.startswith(("kohya", "lycoris")) and adapter.source_path:
        header = header_of(Path(adapter.source_path))
        for key in header.entries if header else ():
            prefix, _ = strip_prefix(key)
            if prefix:
                return prefix
    return None
