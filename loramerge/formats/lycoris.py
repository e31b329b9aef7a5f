"""LyCORIS files (`ss_network_module` lycoris.kohya): LoCon (and Tucker), LoHa, LoKr, full,
DoRA and DyLoRA modules, each read as the plain LoRA that equals LyCORIS's own forward."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loramerge.adapter import Adapter, LazyTensor, LoraModule
from loramerge.errors import FormatError
from loramerge.formats import kohya, kohya_detect, kohya_names, kohya_writer
from loramerge.formats.common import lazy_safetensors
from loramerge.formats.dylora import UNIT_KEY

if TYPE_CHECKING:
    from loramerge.formats.registry import ReadOptions

SOURCE = "lycoris"  # Adapter.source_format
DYLORA = "lycoris-dylora"  # Adapter.source_format of LyCORIS DyLoRA files
# Adapter.metadata: JSON list of the module keys whose DoRA magnitude follows LyCORIS's norm
# convention (||V|| + eps); see fold_dora_epsilon
DORA_KEY = "loramerge.lycoris_dora"
# LyCORIS adds float32's machine epsilon to each output row's norm (its _weight_decompose)
DORA_EPS = 2.0**-23  # torch.finfo(torch.float32).eps, without loading torch to say so


def sniff(path: Path) -> bool:
    header = kohya_detect.header_of(path)
    return header is not None and SOURCE in kohya_detect.evidence(header)


def network_args(metadata: dict[str, str], path: Path) -> dict[str, object]:
    text = metadata.get("ss_network_args")
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError:
        raise FormatError(f"ss_network_args is not valid JSON: {text[:60]!r}", file=path) from None
    return args if isinstance(args, dict) else {}


def read(path: Path, options: ReadOptions | None = None) -> Adapter:
    # LoHa/LoKr math: torch, loaded when read
    from loramerge.formats import lycoris_modules, lycoris_parts

    tensors, metadata = lazy_safetensors(path)
    args = network_args(metadata, path)
    grouped: dict[str, dict[str, LazyTensor]] = {}
    for key, tensor in tensors.items():
        match = kohya_detect.ANY_KEY.match(key)
        if match is None:
            raise FormatError(
                f"tensor {key!r} is not a LyCORIS module tensor (<lora_name>.<part>)", file=path
            )
        grouped.setdefault(match["name"], {})[match["part"]] = tensor
    if not grouped:
        raise FormatError("holds no LyCORIS tensors", file=path)
    names = kohya_names.resolve_names(list(grouped), metadata)
    if str(args.get("algo", "")).lower() == "dylora":
        return _read_dylora(path, grouped, names, metadata, args)
    context = lycoris_parts.Context(path, lycoris_parts.proj_is_conv(grouped, names, metadata))
    modules, algorithms, dora = [], {}, []
    for name, parts in grouped.items():
        component, module_path = names[name]
        algorithm = lycoris_parts.algorithm_of(path, name, parts)
        with_path = lycoris_modules.BUILDERS[algorithm](
            context, name, parts, component, module_path
        )
        modules.append(with_path)
        algorithms[algorithm] = algorithms.get(algorithm, 0) + 1
        if with_path.magnitude is not None:
            dora.append(with_path)
    keyed = kohya_names.keyed_once(path, modules, names)
    notes = kohya_names.name_notes(names)
    extra = {kohya_names.NAMES_KEY: kohya_names.names_record(names)}
    if dora:
        extra[DORA_KEY] = json.dumps([k for k, m in keyed.items() if m.magnitude is not None])
        notes.append(
            "LyCORIS DoRA: W' = m V / (||V||_row + eps), eps = 1.19e-7; a PEFT DoRA has no eps, "
            "so converting folds eps into m against the base model (it needs one)"
        )
    info = kohya.stamp(
        _tool(metadata),
        ", ".join(
            f"{lycoris_modules.ALGORITHM_NAMES[a]} ({n} modules)"
            for a, n in sorted(algorithms.items())
        ),
        _scale_rule(algorithms),
        notes,
    )
    plain = set(algorithms) == {"locon"} and not dora
    if plain:
        extra[kohya_writer.LYCORIS_AS_KOHYA_KEY] = "true"
    return Adapter(
        modules=keyed,
        base_model=metadata.get("ss_base_model_version"),
        source_format=SOURCE,
        source_path=str(path),
        metadata={**metadata, **info, **extra},
    )


def _tool(metadata: dict[str, str]) -> str:
    trainer = metadata.get("ss_network_module")
    return f"LyCORIS ({trainer})" if trainer else "LyCORIS (no training metadata)"


def _scale_rule(algorithms: dict[str, int]) -> str:
    rule = "alpha / r per module, r the LyCORIS dim (alpha = r where missing or 0)"
    if "lokr" in algorithms:
        rule += "; LoKr with both sides full: 1"
    if "full" in algorithms:
        rule += "; full: 1"
    return rule


def _read_dylora(
    path: Path,
    grouped: dict[str, dict[str, LazyTensor]],
    names: dict[str, tuple[str | None, str]],
    metadata: dict[str, str],
    args: dict[str, object],
) -> Adapter:
    """LyCORIS DyLoRA: a plain lora_down/lora_up/alpha file whose forward with n blocks of
    `block_size` ranks scales the first n * block_size ranks by alpha / n. As a LoRA of rank r
    that is alpha' / r with alpha' = alpha * block_size, and truncating to b ranks keeps alpha'
    (docs/rules.md section 2 with alpha' for alpha)."""

    try:
        block = int(str(args.get("block_size", 4)))  # LyCORIS's default block size
    except ValueError:
        block = 0
    if block < 1:
        raise FormatError(
            f"ss_network_args has an invalid DyLoRA block_size {args.get('block_size')!r}",
            file=path,
        )
    modules = [
        _dylora_module(path, name, parts, names[name], block) for name, parts in grouped.items()
    ]
    info = kohya.stamp(
        _tool(metadata),
        f"DyLoRA (LyCORIS, block_size {block}): lora_down / lora_up",
        f"LyCORIS DyLoRA: alpha / n for n blocks of block_size {block}, i.e. alpha' / r with "
        f"alpha' = alpha * {block}; truncation to b keeps alpha'",
        kohya_names.name_notes(names),
    )
    return Adapter(
        modules=kohya_names.keyed_once(path, modules, names),
        base_model=metadata.get("ss_base_model_version"),
        source_format=DYLORA,
        source_path=str(path),
        metadata={
            **metadata,
            **info,
            kohya_names.NAMES_KEY: kohya_names.names_record(names),
            UNIT_KEY: str(block),
        },
    )


def _dylora_module(
    path: Path,
    name: str,
    parts: dict[str, LazyTensor],
    where: tuple[str | None, str],
    block: int,
) -> LoraModule:
    """One DyLoRA module as a LoRA of its full rank, alpha' = alpha * block_size."""
    from loramerge.formats import lycoris_parts

    strangers = set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"}
    if strangers:
        raise FormatError(
            f"has tensors LyCORIS DyLoRA does not write: {sorted(strangers)}",
            file=path,
            module=name,
        )
    down, up = lycoris_parts.need(path, name, parts, "lora_down.weight", "lora_up.weight")
    plain = kohya._module(path, name, {"lora_down.weight": down, "lora_up.weight": up}, *where)
    if plain.r % block:
        raise FormatError(
            f"has rank {plain.r}, not a multiple of the DyLoRA block_size {block}",
            file=path,
            module=name,
        )
    return replace(plain, alpha=lycoris_parts.alpha_of(path, name, parts, plain.r) * block)


def fold_dora_epsilon(
    adapter: Adapter, base_weight: Callable[[str, LoraModule], torch.Tensor]
) -> Adapter:
    """LyCORIS DoRA magnitudes turned into PEFT DoRA magnitudes for the given base.

    LyCORIS scales each output row of V = W + s B A by m / (||V||_row + eps); PEFT by
    m' / ||V||_row. They agree for m' = m ||V||_row / (||V||_row + eps), which depends on W:
    `base_weight(key, module)` gives the base weight of each DoRA module (out first). Computed
    in float64, rounded once to float32.
    """
    keys = json.loads(adapter.metadata.get(DORA_KEY, "[]"))
    modules = dict(adapter.modules)
    for key in keys:
        module = modules.get(key)
        if module is None or module.magnitude is None:
            continue
        weight = base_weight(key, module).to(torch.float64)
        out_features = module.magnitude.shape[0]
        if weight.shape[0] != out_features:
            raise FormatError(
                f"the base weight {list(weight.shape)} has not {out_features} outputs",
                file=adapter.source_path,
                module=key,
            )
        lora_b, lora_a = (t.to(torch.float64) for t in module.factors())
        merged = weight.reshape(out_features, -1) + module.scale * (lora_b @ lora_a)
        norm = torch.linalg.vector_norm(merged, dim=1)
        magnitude = module.magnitude.float().to(torch.float64) * norm / (norm + DORA_EPS)
        modules[key] = replace(module, magnitude=LazyTensor.of(magnitude.to(torch.float32)))
    metadata = {k: v for k, v in adapter.metadata.items() if k != DORA_KEY}
    notes = metadata.get(kohya.READ_NOTES, "")
    metadata[kohya.READ_NOTES] = notes + ("; " if notes else "") + "DoRA eps folded into m"
    return replace(adapter, modules=modules, metadata=metadata)


def needs_dora_fold(adapter: Adapter) -> bool:
    return bool(json.loads(adapter.metadata.get(DORA_KEY, "[]")))
