"""torchtune's native adapter checkpoint: `adapter_model.pt`, a torch.save of a flat dict.

What torchtune 0.6 writes (fixtures/torchtune, checked against its forward):
- keys in torchtune's names: `layers.N.attn.{q,k,v,output}_proj`, `layers.N.mlp.w1/w2/w3`
  (gate, down, up), `output` (lm_head), each with `.lora_a.weight` (r x in),
  `.lora_b.weight` (out x r) and for DoRA `.magnitude` (out);
- the rows of q_proj and k_proj are in torchtune's interleaved rotary order: Hugging Face's
  order is t.view(heads, head_dim / 2, 2, ...).transpose(1, 2), applied to lora_b and to DoRA
  magnitudes (heads = num_attention_heads for q, num_key_value_heads for k);
- scale lora_alpha / lora_rank; neither is stored. The rank is the factors' own; lora_alpha
  comes from --alpha or from the adapter_config.json torchtune writes beside the file (its
  PEFT export). Head counts come from the config.json torchtune copies beside it, or --base.

The file is loaded only through torch.load(weights_only=True); detection reads the key names
from the pickle's opcodes without unpickling anything.
"""

from __future__ import annotations

import math
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

from loramerge.adapter import Adapter, LazyTensor, LoraModule, ModuleKind
from loramerge.errors import FormatError, OptionError, opt
from loramerge.formats import provenance
from loramerge.formats.common import load_pickle_weights, require_positive, require_rank
from loramerge.formats.derived import derived
from loramerge.formats.gguf_arch import unpermute_rows
from loramerge.io.json_files import read_json

FORMAT = "torchtune"
WEIGHTS_NAME = "adapter_model.pt"
PEFT_CONFIG = "adapter_config.json"  # torchtune's PEFT export: r and lora_alpha
MODEL_CONFIG = "config.json"  # the base's config, copied by torchtune's checkpointer
_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_a\.weight|lora_b\.weight|magnitude)$")
_LAYER = re.compile(r"^layers\.(?P<n>\d+)\.(?P<rest>.+)$")
_NAMES = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}
# Hugging Face model types that torchtune's checkpointer converts with convert_weights
# (q/k rows permuted as above); others use their own converters and are refused
MODEL_TYPES = ("llama", "mistral")
_SIGNATURE = re.compile(r"^(layers\.\d+\.(attn|mlp)\.[a-z0-9_]+|output)\.lora_[ab]\.weight$")


def hf_path(name: str) -> str | None:
    """The Hugging Face module path of a torchtune module name (None when unknown)."""
    if name == "output":
        return "lm_head"
    found = _LAYER.match(name)
    if found is None or found["rest"] not in _NAMES:
        return None
    return f"model.layers.{found['n']}.{_NAMES[found['rest']]}"


def _weights(path: Path) -> Path:
    return path / WEIGHTS_NAME if path.is_dir() else path


def pickle_strings(path: Path, limit: int = 100_000) -> list[str] | None:
    """The string constants of a torch.save zip archive's data.pkl, read from the pickle's
    opcodes without executing any of them; None when the file is not such an archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1 or archive.getinfo(names[0]).file_size > 64 * 2**20:
                return None
            data = archive.read(names[0])
        strings = []
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in opcode.name:
                strings.append(arg)
                if len(strings) >= limit:
                    break
        return strings
    except Exception:  # any damage
        return None


def sniff(path: Path) -> bool:
    """adapter_model.pt (or a folder holding it) whose keys are torchtune's LoRA names."""
    weights = _weights(path)
    if not weights.is_file() or weights.suffix not in (".pt", ".pth", ".bin"):
        return False
    strings = pickle_strings(weights)
    if strings is None:
        # torchtune's own file name, damaged: claimed so that the reader says what is wrong
        return weights.name == WEIGHTS_NAME
    return any(_SIGNATURE.match(s) for s in strings)


def read(path: Path, options: Any) -> Adapter:
    weights = _weights(path)
    folder = weights.parent
    tensors = load_pickle_weights(weights)
    parts: dict[str, dict[str, LazyTensor]] = {}
    for key, tensor in tensors.items():
        found = _KEY.match(key)
        module = hf_path(found["path"]) if found else None
        if found is None or module is None:
            raise FormatError(
                f"holds tensor {key!r}, which is not a torchtune LoRA parameter of a known "
                "module (layers.N.attn.*_proj, layers.N.mlp.w1/w2/w3, output)",
                file=weights,
            )
        parts.setdefault(module, {})[found["part"].split(".")[0]] = LazyTensor.of(tensor)
    if not parts:
        raise FormatError("holds no LoRA tensors", file=weights)
    ranks = {}
    for module, found in parts.items():
        ranks[module] = _check_factors(weights, module, found)
    alpha = _alpha(folder, weights, options, sorted(set(ranks.values())))
    heads = None
    if any(m.endswith(("q_proj", "k_proj")) for m in parts):
        heads = _head_counts(folder, weights, options)
    modules = {}
    dora = False
    for module, found in parts.items():
        lora_b, magnitude = found["lora_b"], found.get("magnitude")
        dora = dora or magnitude is not None
        if heads is not None and module.endswith(("q_proj", "k_proj")):
            count = heads[0] if module.endswith("q_proj") else heads[1]
            _check_heads(weights, module, lora_b.shape[0], count, heads[2])
            lora_b = _unpermuted(lora_b, count, weights, module)
            if magnitude is not None:
                magnitude = _unpermuted(magnitude, count, weights, module)
        modules[module] = LoraModule(
            path=module,
            lora_A=found["lora_a"],
            lora_B=lora_b,
            alpha=alpha,
            kind=ModuleKind.LINEAR,
            magnitude=magnitude,
        )
    return Adapter(
        modules=modules,
        source_format=FORMAT,
        source_path=str(path),
        metadata=provenance.stamp(
            {},
            "torchtune",
            ("DoRA" if dora else "LoRA")
            + " (torchtune names mapped to Hugging Face paths: attn.output_proj -> "
            "self_attn.o_proj, mlp.w1/w2/w3 -> gate/down/up_proj, output -> lm_head)",
            f"scale lora_alpha / rank = {alpha:g} / r; q_proj / k_proj rows of lora_b"
            + (" and DoRA magnitudes" if dora else "")
            + " permuted from torchtune's rotary order to Hugging Face's",
        ),
    )


def _check_factors(weights: Path, module: str, found: dict[str, LazyTensor]) -> int:
    for part in ("lora_a", "lora_b"):
        if part not in found:
            raise FormatError(f"has no {part}.weight tensor", file=weights, module=module)
    lora_a, lora_b = found["lora_a"], found["lora_b"]
    if (
        len(lora_a.shape) != 2
        or len(lora_b.shape) != 2
        or lora_b.shape[1] != lora_a.shape[0]
        or lora_a.shape[0] == 0
        or not lora_a.dtype.is_floating_point
        or not lora_b.dtype.is_floating_point
    ):
        raise FormatError(
            f"lora_a {list(lora_a.shape)} and lora_b {list(lora_b.shape)} are not LoRA factors",
            file=weights,
            module=module,
        )
    magnitude = found.get("magnitude")
    if magnitude is not None and tuple(magnitude.shape) != (lora_b.shape[0],):
        raise FormatError(
            f"DoRA magnitude is {list(magnitude.shape)}, expected [{lora_b.shape[0]}]",
            file=weights,
            module=module,
        )
    return lora_a.shape[0]


def _alpha(folder: Path, weights: Path, options: Any, ranks: list[int]) -> float:
    """lora_alpha from --alpha, or from torchtune's adapter_config.json beside the file."""
    given = getattr(options, "alpha", None)
    config_path = folder / PEFT_CONFIG
    stored = None
    if config_path.is_file():
        config = read_json(config_path)
        if "lora_alpha" in config:
            stored = require_positive(config["lora_alpha"], "lora_alpha", config_path)
        if "r" in config:
            r = require_rank(config["r"], "r", config_path)
            if ranks != [r]:
                raise FormatError(
                    f"gives r {r} but adapter_model.pt has rank {', '.join(map(str, ranks))}",
                    file=config_path,
                    hint="this adapter_config.json belongs to another run",
                )
    if given is not None:
        if isinstance(given, bool) or not (isinstance(given, (int, float)) and given > 0):
            raise OptionError("must be a positive number", option="alpha", value=given)
        if not math.isfinite(given):
            raise OptionError("must be finite", option="alpha", value=given)
        given = float(given)
        if stored is not None and stored != given:
            raise OptionError(
                f"disagrees with lora_alpha {stored:g} in {config_path}",
                option="alpha",
                value=given,
                file=weights,
                hint=f"drop {opt('alpha')}, or pass the recipe's lora_alpha",
            )
        return given
    if stored is None:
        raise OptionError(
            "torchtune's adapter_model.pt stores no lora_alpha",
            file=weights,
            hint=f"pass {opt('alpha')} with the recipe's lora_alpha (the rank is the factors' "
            f"own), or keep the {PEFT_CONFIG} torchtune wrote beside it",
        )
    return stored


def _head_counts(folder: Path, weights: Path, options: Any) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) from config.json beside the file
    (torchtune copies the base's) or from --base."""
    config_path = folder / MODEL_CONFIG
    if not config_path.is_file():
        base = getattr(options, "base", None)
        if base is None:
            raise OptionError(
                "torchtune keeps q_proj / k_proj rows in its own rotary order; undoing that "
                "needs the base model's head counts",
                file=weights,
                hint=f"pass {opt('base')}, or keep the {MODEL_CONFIG} torchtune copied beside "
                "the file",
            )
        from loramerge.model.folder import resolve_base

        config_path = resolve_base(base) / MODEL_CONFIG
    config = read_json(config_path)
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise FormatError(
            f"model_type {model_type!r}: loramerge knows torchtune's q/k row order only for "
            f"{', '.join(MODEL_TYPES)}",
            file=config_path,
        )
    heads = require_rank(config.get("num_attention_heads"), "num_attention_heads", config_path)
    kv_heads = require_rank(
        config.get("num_key_value_heads", heads), "num_key_value_heads", config_path
    )
    hidden = require_rank(config.get("hidden_size"), "hidden_size", config_path)
    head_dim = config.get("head_dim") or hidden // heads
    head_dim = require_rank(head_dim, "head_dim", config_path)
    return heads, kv_heads, head_dim


def _check_heads(weights: Path, module: str, rows: int, heads: int, head_dim: int) -> None:
    if rows != heads * head_dim or head_dim % 2:
        raise FormatError(
            f"has {rows} output rows, not {heads} heads of an even size {head_dim}",
            file=weights,
            module=module,
            hint="pass the base model this adapter was trained on",
        )


def _unpermuted(tensor: LazyTensor, heads: int, weights: Path, module: str) -> LazyTensor:
    return derived(
        lambda: unpermute_rows(tensor.read(), heads),
        tensor.shape,
        tensor.dtype,
        path=weights,
        module=module,
    )
