"""The ordered list of adapter formats: detection, reading and writing dispatch through it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loramerge.adapter import Adapter
from loramerge.errors import OptionError, UnknownFormatError
from loramerge.formats import dylora, gguf, kohya, mlx_lm, peft, peft_tuners, torchtune
from loramerge.io.safetensors_header import read_header


@dataclass(frozen=True)
class ReadOptions:
    """Facts a format cannot carry itself, supplied by the user."""

    alpha: float | None = None
    # the base model (folder or hub id), for formats that leave sizes or head counts to it
    # (PEFT VeRA and MiSS input sizes, torchtune's q/k head counts)
    base: str | Path | None = None


@dataclass(frozen=True)
class InputFormat:
    name: str
    description: str
    sniff: Callable[[Path], bool]
    read: Callable[[Path, ReadOptions], Adapter]


@dataclass(frozen=True)
class OutputFormat:
    name: str
    description: str
    is_dir: bool
    write: Callable[..., None]  # (adapter, path), plus the base config when needs_base
    needs_base: bool = False
    engine: str | None = None  # the engine profile this format always applies


# Most specific first: the first sniffer that claims a path wins only if no other claims it.
INPUT_FORMATS: list[InputFormat] = [
    InputFormat(
        "peft", "PEFT adapter folder (adapter_config.json)", peft.sniff, lambda p, o: peft.read(p)
    ),
    InputFormat(
        "mlx-lm",
        "mlx-lm adapter folder (adapters.safetensors, lora_parameters)",
        mlx_lm.sniff,
        lambda p, o: mlx_lm.read(p),
    ),
    InputFormat(
        "kohya", "kohya / sd-scripts LoRA .safetensors", kohya.sniff, lambda p, o: kohya.read(p)
    ),
    InputFormat(
        "torchtune",
        "torchtune native adapter_model.pt (needs lora_alpha)",
        torchtune.sniff,
        torchtune.read,
    ),
    InputFormat("dylora", "DyLoRA official (loralib)", dylora.sniff_official, dylora.read_official),
    InputFormat("kohya-dylora", "kohya DyLoRA .safetensors", dylora.sniff_kohya, dylora.read_kohya),
    InputFormat("gguf", "llama.cpp LoRA GGUF file", gguf.sniff, lambda p, o: gguf.read(p)),
]

OUTPUT_FORMATS: list[OutputFormat] = [
    OutputFormat("peft", "PEFT adapter folder", True, peft.write),
    OutputFormat("kohya", "kohya .safetensors file", False, kohya.write),
    OutputFormat("mlx-lm", "mlx-lm adapter folder", True, mlx_lm.write),
    OutputFormat(
        "gguf", "llama.cpp LoRA GGUF file (needs --base)", False, gguf.write, True, "llama.cpp"
    ),
]


# source formats that store no alpha, so --alpha supplies it
USER_ALPHA_FORMATS = ("dylora", "torchtune")


def check_user_alpha(adapter: Adapter, alpha: float | None, source: str | Path) -> None:
    """Refuse --alpha for an input that stores its own alpha."""
    if alpha is not None and adapter.source_format not in USER_ALPHA_FORMATS:
        raise OptionError(
            f"--alpha is for official DyLoRA checkpoints and torchtune's adapter_model.pt, "
            f"which store none; this {adapter.source_format} input stores its own",
            path=source,
        )


def input_format(name: str) -> InputFormat:
    for entry in INPUT_FORMATS:
        if entry.name == name:
            return entry
    names = ", ".join(e.name for e in INPUT_FORMATS)
    raise OptionError(f"unknown input format {name!r}; choose one of {names}")


def output_format(name: str) -> OutputFormat:
    for entry in OUTPUT_FORMATS:
        if entry.name == name:
            return entry
    names = ", ".join(e.name for e in OUTPUT_FORMATS)
    raise OptionError(f"unknown output format {name!r}; choose one of {names}")


def _has_resconfig(config: Path) -> bool:
    try:
        return config.is_file() and "resconfig" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def describe_path(path: Path) -> str:
    """A short account of what a path holds, for messages when no format claims it."""
    if not path.exists():
        return "nothing exists at this path"
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        if "reslora_config.json" in names or _has_resconfig(path / "config.json"):
            return "a ResLoRA checkpoint: convert it with `loramerge reslora`"
        if "cola_chain.json" in names:
            return "a COLA chain: fold it with `loramerge fold`"
        if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
            return "a folder with config.json and weights: a base model, not an adapter"
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        return f"a folder holding {shown or 'nothing'}"
    if path.suffix == ".safetensors":
        try:
            header = read_header(path)
        except Exception as exc:
            return f"a .safetensors file that cannot be read ({exc})"
        sample = ", ".join(list(header.entries)[:3])
        names = list(header.entries)
        if any(n.endswith(".lora_E") for n in names):
            return (
                "a PEFT AdaLoRA state dict (lora_E) without its adapter_config.json, which "
                "holds lora_alpha and init_r: read the folder it came from"
            )
        if names and all(n.endswith((".lora_a", ".lora_b", ".m")) for n in names):
            return (
                "mlx-lm adapter weights (lora_a, lora_b) without their adapter_config.json, "
                "which holds the scale: read the folder it came from"
            )
        return f"a .safetensors file with {len(header.entries)} tensors such as {sample}"
    return f"a {path.suffix or 'extension-less'} file"


def detect(path: Path) -> InputFormat:
    claims = [entry for entry in INPUT_FORMATS if entry.sniff(path)]
    if len(claims) > 1:
        names = " and ".join(e.name for e in claims)
        raise UnknownFormatError(
            f"is claimed by {names}", path=path, hint="pass --format to pick one"
        )
    if not claims:
        known = ", ".join(e.name for e in INPUT_FORMATS)
        raise UnknownFormatError(
            f"is not an adapter loramerge recognises: {describe_path(path)}",
            path=path,
            hint=f"known formats: {known}; pass --format if you know which it is",
        )
    return claims[0]


def read_adapter(
    path: str | Path, fmt: str | None = None, options: ReadOptions | None = None
) -> Adapter:
    path = Path(path)
    if not path.exists():
        raise UnknownFormatError("does not exist", path=path, hint="check the path")
    entry = input_format(fmt) if fmt else detect(path)
    options = options or ReadOptions()
    with peft_tuners.reading_base(options.base):
        return entry.read(path, options)
