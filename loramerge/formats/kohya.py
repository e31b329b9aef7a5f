"""kohya / sd-scripts LoRA files: one `.safetensors`, `lora_down`/`lora_up`/`alpha` per module."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from loramerge import __version__
from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind
from loramerge.errors import FormatError, opt
from loramerge.formats import sd_names
from loramerge.formats.common import lazy_safetensors
from loramerge.formats.components import keyed
from loramerge.io.safetensors_header import SafetensorsHeader, read_header
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
    "time_emb_proj",
    "conv_shortcut",
    "block_sparse_moe",
    "shared_expert",
)


_ANY_KEY = re.compile(r"^(?P<name>lora_[A-Za-z0-9_]+)\.(?P<part>.+)$")
# Tensor parts that only LyCORIS writes: LoHa, LoKr, full, Tucker LoCon, DoRA, and the methods it
# cannot turn into a LoRA (OFT/BOFT, GLoRA, IA3, norm). LoCon itself uses kohya's own parts.
LYCORIS_PARTS = frozenset(
    {
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1",
        "lokr_t2", "diff", "diff_b", "lora_mid.weight", "dora_scale", "oft_blocks", "oft_diag",
        "rescale", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "w_norm", "b_norm",
        "on_input", "weight",
    }
)  # fmt: skip
# Adapter.metadata keys written by the readers of kohya-style files (never written to outputs)
NAMES_KEY = "loramerge.kohya_names"  # JSON {"<component>.<path>": the source's kohya name}
READ_PREFIX = "loramerge.read."  # what the reader read: shown by `inspect`
READ_TOOL, READ_ALGORITHM = READ_PREFIX + "tool", READ_PREFIX + "algorithm"
READ_RULE, READ_NOTES = READ_PREFIX + "rule", READ_PREFIX + "notes"
_SD_VERSIONS = ("sd_", "sdxl", "sd3", "flux")


def header_of(path: Path) -> SafetensorsHeader | None:
    """The header of a .safetensors file, or None for anything else (sniffers never raise)."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    try:
        return read_header(path)
    except FormatError:
        return None


def evidence(header: SafetensorsHeader) -> set[str]:
    """The kohya-style formats a file's keys and `ss_network_module` speak for: `kohya`,
    `kohya-dylora`, `lycoris`. Two of them at once is a contradiction the caller refuses."""
    parts = {m["part"] for name in header.entries if (m := _ANY_KEY.match(name))}
    kohya_keys = bool(parts & {"lora_down.weight", "lora_up.weight"})
    lycoris_keys = bool(parts & LYCORIS_PARTS)
    trainer = header.metadata.get("ss_network_module", "")
    found = set()
    if trainer.startswith("lycoris") or lycoris_keys:
        found.add("lycoris")
    if kohya_keys and not trainer.startswith("lycoris"):
        if trainer == "networks.dylora":
            found.add("kohya-dylora")
        elif trainer or not lycoris_keys:  # a LyCORIS file without metadata mixes LoCon keys in
            found.add("kohya")
    return found


def sniff(path: Path) -> bool:
    header = header_of(path)
    return header is not None and "kohya" in evidence(header)


def _looks_kohya(path: Path, dylora: bool) -> bool:
    header = header_of(path)
    return header is not None and ("kohya-dylora" if dylora else "kohya") in evidence(header)


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


def is_stable_diffusion(names: list[str], metadata: dict[str, str]) -> bool:
    """Whether a kohya-style file adapts a diffusion pipeline (its `lora_te_` modules are then
    the text encoder's) rather than one model that kohya's default prefix was written for."""
    prefixes = {sd_names.split_kohya_name(name)[0] for name in names}
    if prefixes & {"lora_unet", "lora_te1", "lora_te2", "lora_te3"}:
        return True
    version = metadata.get("ss_base_model_version", "")
    if version.startswith(_SD_VERSIONS) or "ss_v2" in metadata:
        return True
    rests = [sd_names.split_kohya_name(n)[2] for n in names if n.startswith("lora_te_")]
    return bool(rests) and all(sd_names.kohya_module_path("text_encoder", rest) for rest in rests)


def resolve_names(names: list[str], metadata: dict[str, str]) -> dict[str, tuple[str | None, str]]:
    """(component, module path) of each kohya module name: exact where the component's
    architecture names are known (SD UNets, CLIP text encoders), a best guess otherwise."""
    stable_diffusion = is_stable_diffusion(names, metadata)
    resolved = {}
    for name in names:
        _, component, rest = sd_names.split_kohya_name(name)
        if not stable_diffusion:
            component = None
        path = sd_names.kohya_module_path(component, rest) if component else None
        resolved[name] = (component, path or kohya_to_path(name))
    return resolved


def stamp(tool: str, algorithm: str, rule: str, notes: list[str]) -> dict[str, str]:
    """What a reader read, as Adapter.metadata entries `loramerge.read.{tool, algorithm, rule,
    notes}` (shown by `inspect`; never written to an output)."""
    info = {READ_TOOL: tool, READ_ALGORITHM: algorithm, READ_RULE: rule}
    if notes:
        info[READ_NOTES] = "; ".join(notes)
    return info


def name_notes(names: dict[str, tuple[str | None, str]]) -> list[str]:
    """Notes on a kohya-style file's components and how its module paths were found."""
    notes = []
    counts: dict[str, int] = {}
    for component, _ in names.values():
        counts[component or "one model"] = counts.get(component or "one model", 0) + 1
    if None not in {c for c, _ in names.values()}:
        notes.append("components " + ", ".join(f"{c} ({n})" for c, n in counts.items()))
    guessed = [
        name
        for name, (component, _) in names.items()
        if component is None
        or not sd_names.kohya_module_path(component, sd_names.split_kohya_name(name)[2])
    ]
    ldm = any(
        c == "unet" and sd_names.is_ldm_unet_name(sd_names.split_kohya_name(n)[2])
        for n, (c, _) in names.items()
    )
    if guessed:
        notes.append(
            f"{len(guessed)} of {len(names)} module paths guessed from common layer names "
            "(exact against the base model)"
        )
    else:
        notes.append(
            "module paths from the architecture's own names"
            + (" (original LDM UNet names mapped to diffusers paths)" if ldm else "")
        )
    return notes


def read(path: Path) -> Adapter:
    tensors, metadata = lazy_safetensors(path)
    grouped: dict[str, dict[str, LazyTensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            found = _ANY_KEY.match(key)
            if found and found["part"] in LYCORIS_PARTS:
                raise FormatError(
                    f"tensor {key!r} belongs to a LyCORIS method, not plain LoRA",
                    file=path,
                    hint=f"read it as LyCORIS ({opt('format')} lycoris)",
                )
            continue
        grouped.setdefault(match["name"], {})[match["part"]] = tensor
    if not grouped:
        raise FormatError("holds no kohya LoRA tensors", file=path)
    names = resolve_names(list(grouped), metadata)
    modules = [_module(path, name, parts, *names[name]) for name, parts in grouped.items()]
    trainer = metadata.get("ss_network_module", "")
    info = stamp(
        f"kohya sd-scripts ({trainer})" if trainer else "kohya-style LoRA file",
        "LoRA (lora_down / lora_up)",
        "scale alpha / r with each module's .alpha (r when absent)",
        name_notes(names),
    )
    return Adapter(
        modules=keyed_once(path, modules, names),
        base_model=metadata.get("ss_base_model_version") or metadata.get("ss_sd_model_name"),
        source_format="kohya",
        source_path=str(path),
        metadata={**metadata, **info, NAMES_KEY: names_record(names)},
    )


def keyed_once(
    path: Path, modules: list[LoraModule], names: dict[str, tuple[str | None, str]]
) -> dict[str, LoraModule]:
    """Modules keyed as an Adapter keys them; two kohya names for one module are refused."""
    seen: dict[tuple[str | None, str], str] = {}
    for name, where in names.items():
        if where in seen:
            raise FormatError(
                f"names {seen[where]} and {name} are the same module {where[1]}", file=path
            )
        seen[where] = name
    return keyed(modules)


def names_record(names: dict[str, tuple[str | None, str]]) -> str:
    """JSON for NAMES_KEY: each module's kohya name in the source, by `<component>.<path>`."""
    return json.dumps({f"{component}.{path}": name for name, (component, path) in names.items()})


def _module(
    path: Path,
    name: str,
    parts: dict[str, LazyTensor],
    component: str | None = None,
    module_path: str | None = None,
) -> LoraModule:
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None:
        missing = "lora_down" if down is None else "lora_up"
        raise FormatError(f"has no {missing} tensor", file=path, module=name)
    r = down.shape[0] if down.shape else 0
    if len(down.shape) == 4 and len(up.shape) == 2 and up.shape[1] == r:
        up = _as_conv_up(up)  # LyCORIS's DyLoRA saves a conv module's up as (out, r)
    if (
        len(down.shape) not in (2, 4)
        or len(up.shape) != len(down.shape)
        or up.shape[1] != r
        or r == 0
        or any(size != 1 for size in up.shape[2:])
    ):
        raise FormatError(
            f"lora_down {list(down.shape)} and lora_up {list(up.shape)} are not LoRA factors",
            file=path,
            module=name,
        )
    alpha = stored_alpha(path, name, parts, float(r))
    kind = ModuleKind.CONV if len(down.shape) == 4 else ModuleKind.LINEAR
    return LoraModule(
        path=module_path or kohya_to_path(name),
        lora_A=down,
        lora_B=up,
        alpha=alpha,
        kind=kind,
        component=component,
    )


def _as_conv_up(up: LazyTensor) -> LazyTensor:
    shape = (*up.shape, 1, 1)
    return LazyTensor(shape, up.dtype, lambda: up.read().reshape(shape))


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


def stored_alpha(
    path: Path, name: str, parts: dict[str, LazyTensor], missing: float, zero: float | None = None
) -> float:
    """The `.alpha` a kohya-style file stores for a module: `missing` when it stores none,
    `zero` (when given) for a stored 0, and otherwise a positive number or refused."""
    if "alpha" not in parts:
        return missing
    if math.prod(parts["alpha"].shape) != 1:
        raise FormatError(
            f"alpha must hold one number, it has shape {list(parts['alpha'].shape)}",
            file=path,
            module=name,
        )
    alpha = float(parts["alpha"].load().reshape(-1)[0].item())
    if alpha == 0 and zero is not None:
        return zero
    if not (math.isfinite(alpha) and alpha > 0):
        raise FormatError(f"alpha must be a positive number, got {alpha}", file=path, module=name)
    return alpha
