"""The ordered list of adapter formats: detection, reading and writing dispatch through it, and
the command line's choices and the docs' tables are made from it.

Each entry names its module under `loramerge.formats` and the functions there; the module is
imported on first use, so that this table (and `loramerge --help`) loads without torch.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramerge.errors import UnknownFormatError, UsageError, opt

if TYPE_CHECKING:
    from loramerge.adapter import Adapter


@dataclass(frozen=True)
class ReadOptions:
    """Facts a format cannot carry itself, supplied by the user or the base model."""

    alpha: float | None = None  # official DyLoRA checkpoints and torchtune's files store none
    base_config: Mapping[str, Any] | None = None  # GGUF, torchtune: head counts, module names
    # the base model itself (a folder or hub id): PEFT VeRA and MiSS take input sizes from its
    # weight shapes
    base: str | Path | None = None


def _function(module: str, name: str) -> Callable[..., Any]:
    return getattr(importlib.import_module(f"loramerge.formats.{module}"), name)


@dataclass(frozen=True)
class InputFormat:
    """A format loramerge reads: `module`.`sniff_name`(path) claims a path and
    `module`.`read_name`(path[, options]) reads it."""

    name: str
    description: str
    module: str
    sniff_name: str = "sniff"
    read_name: str = "read"
    takes_options: bool = False  # the reader's second argument is a ReadOptions

    def sniff(self, path: Path) -> bool:
        return _function(self.module, self.sniff_name)(path)

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        reader = _function(self.module, self.read_name)
        return reader(path, options) if self.takes_options else reader(path)


@dataclass(frozen=True)
class OutputFormat:
    """A format loramerge writes: `module`.write(adapter, path[, base config])."""

    name: str
    description: str
    module: str
    suffix: str | None  # a file's required suffix; None for a folder
    needs_base: bool = False  # the writer takes the base model's config.json
    engine: str | None = None  # the engine profile this format always applies

    @property
    def is_dir(self) -> bool:
        return self.suffix is None

    def write(self, adapter: Adapter, path: Path, base_config: Mapping[str, Any] | None) -> None:
        writer = _function(self.module, "write")
        if self.needs_base:
            writer(adapter, path, base_config)
        else:
            writer(adapter, path)


# Most specific first: the first sniffer that claims a path wins only if no other claims it.
INPUT_FORMATS: list[InputFormat] = [
    InputFormat("peft", "PEFT adapter folder (adapter_config.json, any peft_type)", "peft"),
    InputFormat("mlx-lm", "mlx-lm adapter folder (adapters.safetensors)", "mlx_lm"),
    InputFormat("kohya", "kohya / sd-scripts LoRA .safetensors", "kohya"),
    InputFormat("torchtune", "torchtune native adapter_model.pt", "torchtune", takes_options=True),
    InputFormat(
        "dylora", "DyLoRA official (loralib)", "dylora", "sniff_official", "read_official", True
    ),
    InputFormat(
        "kohya-dylora", "kohya DyLoRA .safetensors", "dylora", "sniff_kohya", "read_kohya", True
    ),
    InputFormat("gguf", "llama.cpp LoRA GGUF file", "gguf", takes_options=True),
    InputFormat("lycoris", "LyCORIS .safetensors (LoCon, LoHa, LoKr, full, DyLoRA)", "lycoris"),
    InputFormat(
        "diffusers",
        "diffusers LoRA (pytorch_lora_weights.safetensors or its folder)",
        "diffusers_lora",
    ),
]

OUTPUT_FORMATS: list[OutputFormat] = [
    OutputFormat(
        "peft", "PEFT adapter folder (one per component for a pipeline)", "peft_components", None
    ),
    OutputFormat("kohya", "kohya .safetensors file", "kohya_writer", ".safetensors"),
    OutputFormat(
        "gguf",
        "llama.cpp LoRA GGUF file (needs the base)",
        "gguf_writer",
        ".gguf",
        True,
        "llama.cpp",
    ),
    OutputFormat(
        "diffusers",
        "diffusers LoRA folder (pytorch_lora_weights.safetensors)",
        "diffusers_writer",
        None,
    ),
    OutputFormat("mlx-lm", "mlx-lm adapter folder", "mlx_lm_writer", None),
]

INPUT_FORMAT_NAMES = tuple(entry.name for entry in INPUT_FORMATS)
OUTPUT_FORMAT_NAMES = tuple(entry.name for entry in OUTPUT_FORMATS)
# Suffixes that make a name look like a file: never given to a folder
FILE_SUFFIXES = frozenset(
    {entry.suffix for entry in OUTPUT_FORMATS if entry.suffix} | {".bin", ".pt", ".pth", ".json"}
)


def _find(entries: list[Any], name: str, option: str, what: str) -> Any:
    for entry in entries:
        if entry.name == name:
            return entry
    names = ", ".join(entry.name for entry in entries)
    raise UsageError(
        f"is not a format loramerge {what}; choose one of {names}", option=option, value=name
    )


def input_format(name: str, option: str = "format") -> InputFormat:
    return _find(INPUT_FORMATS, name, option, "reads")


def output_format(name: str, option: str = "to") -> OutputFormat:
    return _find(OUTPUT_FORMATS, name, option, "writes")


def check_output_name(out: Path, entry: OutputFormat | None, what: str | None = None) -> None:
    """Refuse an output name that contradicts what is written there, so that nothing is ever
    written that loramerge cannot read back as what it holds: a file format needs its suffix,
    and a folder (an adapter folder, or with `entry` None a model folder or `what` other
    folder) must not carry a file's suffix."""
    what = what or (f"a {entry.name} adapter" if entry is not None else "a model")
    if entry is not None and entry.suffix is not None:
        if out.suffix != entry.suffix:
            raise UsageError(
                f"{what} is a {entry.suffix} file, and {out.name!r} does not end in {entry.suffix}",
                option="out",
                value=str(out),
                hint=f"name it {out.with_suffix(entry.suffix).name!r}",
            )
        return
    if out.suffix in FILE_SUFFIXES:
        raise UsageError(
            f"{what} is written as a folder, and a folder named {out.name!r} would look like a "
            f"{out.suffix} file",
            option="out",
            value=str(out),
            hint=f"name it {out.with_suffix('').name!r}, or choose a file format with {opt('to')}",
        )


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
        from loramerge.io.safetensors_header import read_header

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
            f"is claimed by {names}", file=path, hint=f"pass {opt('format')} to pick one"
        )
    if not claims:
        raise UnknownFormatError(
            f"is not an adapter loramerge recognises: {describe_path(path)}",
            file=path,
            hint=f"known formats: {', '.join(INPUT_FORMAT_NAMES)}; pass {opt('format')} if you "
            "know which it is",
        )
    return claims[0]


def read_adapter(
    path: str | Path, fmt: str | None = None, options: ReadOptions | None = None
) -> Adapter:
    """The adapter at `path` (a local path or a cached hub repo id), in format `fmt` or the one
    detected."""
    from loramerge.formats.read_context import reading_base
    from loramerge.io.hub import resolve

    path = resolve(path, what="adapter")
    entry = input_format(fmt) if fmt else detect(path)
    options = options or ReadOptions()
    with reading_base(options.base):
        return entry.read(path, options)


# source formats that store no alpha, so that the alpha option supplies it
USER_ALPHA_FORMATS = ("dylora", "torchtune")


def check_user_alpha(adapter: Adapter, alpha: float | None) -> None:
    """Refuse the alpha option for an input that stores its own alpha."""
    if alpha is not None and adapter.source_format not in USER_ALPHA_FORMATS:
        from loramerge.errors import OptionError

        raise OptionError(
            f"is for official DyLoRA checkpoints and torchtune's adapter_model.pt, which store "
            f"none; this {adapter.source_format} input stores its own",
            option="alpha",
            value=alpha,
            file=adapter.source_path,
        )
