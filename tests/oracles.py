"""Independent logits oracles, evaluated in float64, and a check whose tolerance can fail.

Every model here is run in float64 from the weights as stored (float32 or bf16 upcast exactly),
so the forward pass itself adds no noise worth mentioning (~1e-15 relative). What a check
tolerates is then only what the candidate legitimately changed (a float32 rounding of a folded
scale, say), and the tolerance is derived from the size of the effect under test:

    tolerance = REL_TOL x max |logits with the adapter - logits of the base|

Each check first proves that it can fail: the oracle evaluated with every LoRA scale off by
PLANTED (1e-6 relative) must land outside the tolerance, or the check itself fails. None of this
imports loramerge: the oracles are PEFT's PeftModel, transformers, and dense float64 updates
written from a reading rule in the test that uses them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from helpers import load_causal_lm

PLANTED = 1e-6  # the relative scale error every logits check must be able to see
# The share of the adapter's effect on the logits that a check tolerates. Measured on the
# fixtures (ORACLE_REPORT=1 pytest -s -m oracle): a float32 rounding in an output (a scale folded
# into lora_B, SVD factors, a merged weight) moves the logits by up to 2.4e-7 x the effect, a
# 1e-6 relative scale error by 6.7e-7 x (DoRA, whose norm absorbs part of it) to 2.3e-6 x.
REL_TOL = 5e-7


def load64(folder: Path):
    """A transformers model folder in float64 (stored values upcast exactly)."""
    return load_causal_lm(folder).double().eval()


def logits64(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


class PeftOracle:
    """PEFT's own PeftModel on the base, the adapter applied live, everything in float64; given
    several adapters, all of them active at once (a COLA chain applied live).

    `logits(ids, factor)` multiplies every LoRA layer's scale by `factor` for one forward pass
    (the planted scale error the checks must be able to see)."""

    def __init__(self, adapter: Path | list[Path], base: Path) -> None:
        from peft import PeftModel

        adapters = adapter if isinstance(adapter, list) else [adapter]
        names = [f"link-{i}" for i in range(len(adapters))] if len(adapters) > 1 else ["default"]
        self.base = base
        model = PeftModel.from_pretrained(load_causal_lm(base), adapters[0], adapter_name=names[0])
        for name, path in zip(names[1:], adapters[1:], strict=True):
            model.load_adapter(path, adapter_name=name)
        model.base_model.set_adapter(names)
        self.model = model.eval().double()

    def logits(self, ids: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        saved = [dict(layer.scaling) for layer in layers]
        try:
            for layer in layers:
                for name in layer.scaling:
                    layer.scaling[name] *= factor
            return logits64(self.model, ids)
        finally:
            for layer, scaling in zip(layers, saved, strict=True):
                layer.scaling.update(scaling)


@functools.lru_cache(maxsize=4)
def _cached64(folder: Path):
    model = load64(folder)
    params = model.named_parameters(remove_duplicate=False)
    return model, {name: p.detach().clone() for name, p in params}


def logits_with_deltas(
    base: Path, deltas: Mapping[str, torch.Tensor], ids: torch.Tensor
) -> torch.Tensor:
    """The base in float64 with a dense float64 update added to each named weight (the loaded
    base is kept between calls and restored exactly after each)."""
    model, original = _cached64(Path(base))
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                model.get_parameter(name).add_(delta.to(torch.float64))
        return logits64(model, ids)
    finally:
        with torch.no_grad():
            for name in deltas:
                model.get_parameter(name).copy_(original[name])


def base_logits(base: Path, ids: torch.Tensor) -> torch.Tensor:
    """The base model's own logits, in float64."""
    return logits_with_deltas(base, {}, ids)


def effect_tolerance(oracle: torch.Tensor, base_logits: torch.Tensor, rel: float = REL_TOL):
    """(tolerance, effect): `rel` times max |oracle - base| over all positions and tokens."""
    effect = float((oracle - base_logits).abs().max())
    assert effect > 1e-3, f"the adapter barely changes the model (max logit change {effect:.3g})"
    return rel * effect, effect


def assert_logits_match(
    got: torch.Tensor,
    oracle: torch.Tensor,
    planted: torch.Tensor,
    base_logits: torch.Tensor,
    what: str = "",
    rel: float = REL_TOL,
) -> float:
    """`got` equals the oracle within `rel` x the adapter's effect, and that tolerance is tight
    enough that the oracle with a PLANTED scale error (`planted`) falls outside it. Returns the
    largest difference found."""
    tolerance, effect = effect_tolerance(oracle, base_logits, rel)
    power = float((planted - oracle).abs().max())
    assert power > tolerance, (
        f"{what}: a {PLANTED:g} relative scale error moves the logits by only {power:.3g}, "
        f"inside the tolerance {tolerance:.3g}: this check could not fail"
    )
    difference = float((got - oracle).abs().max())
    if os.environ.get("ORACLE_REPORT"):  # ORACLE_REPORT=1 pytest -s -m oracle: the margins
        ratios = f"difference {difference / effect:.3g}, planted {power / effect:.3g}"
        print(f"\n{what}: {ratios} x the effect")
    assert difference <= tolerance, (
        f"{what}: logits differ from the oracle by {difference:.3g}, more than {tolerance:.3g} "
        f"({rel:g} x the adapter's effect {effect:.3g}; "
        f"a {PLANTED:g} scale error gives {power:.3g})"
    )
    return difference


# --- llama.cpp: its q/k row permutation and how it applies a LoRA GGUF ------------------------

# llama.cpp's tensor names for the LLaMA projections (gguf-py's tensor map)
GGUF_LLAMA_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def llama_cpp_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py permutation of q_proj / k_proj rows (LlamaModel.permute,
    called with the attention heads for q and the key/value heads for k), written out from its
    definition: the rows of each head are two rotary halves of `half` rows; they are interleaved,
    so row (head h, half k, i) moves to row (head h, i, half k)."""
    out = rows.shape[0]
    half = out // heads // 2
    assert heads * 2 * half == out, (out, heads)
    result = torch.empty_like(rows)
    for h in range(heads):
        for k in range(2):
            for i in range(half):
                result[h * 2 * half + 2 * i + k] = rows[h * 2 * half + k * half + i]
    return result


def llama_cpp_unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `llama_cpp_permute`, from the permutation of row indices."""
    moved = llama_cpp_permute(torch.arange(rows.shape[0]), heads)
    result = torch.empty_like(rows)
    result[moved] = rows
    return result


def llama_cpp_gguf_deltas(path: Path, heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """What llama.cpp adds to each base weight when it loads a LoRA GGUF, as float64 dense
    updates in Hugging Face's layout (weight name -> update), read with the gguf package.

    llama.cpp's rule (llama-adapter: llama_adapter_lora_weight::get_scale): each pair is scaled
    by adapter.lora.alpha / rank, rank being lora_b's first GGUF dimension (ne[0], the r of
    the pair), or by 1 when the file has no alpha; the update lands on the weight as llama.cpp
    converted it, so for the `llama` architecture the q/k updates are in permuted row order and
    are mapped back with the inverse of llama.cpp's permutation. token_embd's lora_a holds A^T
    (llama.cpp gathers its rows by token id)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    permuted = fields["general.architecture"] == "llama"
    alpha = fields.get("adapter.lora.alpha")
    tensors = {t.name: torch.from_numpy(t.data.copy()).double() for t in reader.tensors}
    deltas = {}
    for name in tensors:
        if not name.endswith(".lora_a"):
            continue
        stem = name.removesuffix(".lora_a")
        lora_a, lora_b = tensors[name], tensors[stem + ".lora_b"]
        rank = lora_b.shape[1]  # numpy order: GGUF's ne[0] is the last axis
        scale = alpha / rank if alpha else 1.0
        if stem == "token_embd.weight":
            deltas["model.embed_tokens.weight"] = scale * (lora_a @ lora_b.T)
            continue
        delta = scale * (lora_b @ lora_a)
        if stem == "output.weight":
            deltas["lm_head.weight"] = delta
            continue
        block, index, kind, _ = stem.split(".")
        assert block == "blk", stem
        if permuted and kind == "attn_q":
            delta = llama_cpp_unpermute(delta, heads)
        elif permuted and kind == "attn_k":
            delta = llama_cpp_unpermute(delta, kv_heads)
        deltas[f"model.layers.{index}.{GGUF_LLAMA_NAMES[kind]}.weight"] = delta
    return deltas


# --- the merged model a merge must write, evaluated from PEFT's layers -----------------------


def _base_tensors(base: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for shard in sorted(base.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def merged_reference(adapter: Path, base: Path, factor: float = 1.0) -> dict[str, torch.Tensor]:
    """Every tensor of the merged model, in float32, as PEFT defines it: the base's tensors
    (upcast exactly), each LoRA layer's weight plus (B @ A) * s formed in float32 as PEFT merges
    it (DoRA rescaled by m / ||W + dW|| per output, norms in float64), a lora_bias added as
    bias + b * s, modules_to_save replaced by PEFT's trained copy, and, for a base with tied
    embeddings whose input table changed, lm_head as the base's table (what PEFT's live forward
    uses). `factor` multiplies every scale (the planted error)."""
    import json

    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    model = PeftModel.from_pretrained(load_causal_lm(base), adapter)
    original = {name: value.float() for name, value in _base_tensors(base).items()}
    reference = dict(original)
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, ModulesToSaveWrapper):
            reference[name + ".weight"] = layer.modules_to_save["default"].weight.detach().float()
        if not isinstance(layer, LoraLayer) or "default" not in layer.scaling:
            continue
        weight = layer.get_base_layer().weight.detach().float()
        if "default" in layer.lora_A:
            lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        else:
            lora_a, lora_b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        scale = layer.scaling["default"] * factor
        delta = (lora_b.detach() @ lora_a.detach()) * scale
        # GPT-2 Conv1D and embedding tables are stored (in x out); PEFT knows which layer is which
        transposed = getattr(layer, "fan_in_fan_out", False) or "default" not in layer.lora_A
        merged = weight + (delta.T if transposed else delta)
        magnitude = getattr(layer, "lora_magnitude_vector", None)
        if magnitude and "default" in magnitude:
            m = magnitude["default"].weight.detach().reshape(-1).double()
            dim = 0 if transposed else 1
            norms = merged.double().square().sum(dim=dim).sqrt()
            factor_ = (m / norms).float()
            merged = merged * (factor_.reshape(1, -1) if transposed else factor_.reshape(-1, 1))
        reference[name + ".weight"] = merged
        lora_bias = (
            getattr(layer.lora_B["default"], "bias", None) if "default" in layer.lora_B else None
        )
        if lora_bias is not None:
            bias = layer.get_base_layer().bias.detach().float()
            reference[name + ".bias"] = bias + lora_bias.detach() * scale
    config = json.loads((base / "config.json").read_text())
    if config.get("tie_word_embeddings") and "lm_head.weight" not in original:
        table = model.base_model.model.get_input_embeddings()
        embed = next(n for n, m in model.base_model.model.named_modules() if m is table)
        embed = embed.removesuffix(".base_layer") + ".weight"
        if not torch.equal(reference[embed], original[embed]):
            reference["lm_head.weight"] = original[embed]
    return reference


def reference_logits(folder: Path, reference: dict[str, torch.Tensor], dtype, ids) -> torch.Tensor:
    """Logits (float64) of the model `folder` describes (its config) holding the reference's
    tensors rounded once to `dtype`: every parameter must come from the reference."""
    model = load64(folder)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(reference[name].to(dtype).to(torch.float64))
    return logits64(model, ids)


def reference_from_updates(
    base: Path, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]
) -> dict[str, torch.Tensor]:
    """Every tensor of a merged model in float32 when each named weight gets (B @ A) * s, formed
    in float32 in PEFT's order of operations (product, scale, add), the rest copied."""
    reference = {name: value.float() for name, value in _base_tensors(base).items()}
    for name, (lora_b, lora_a, scale) in updates.items():
        delta = (lora_b.float().contiguous() @ lora_a.float().contiguous()) * scale
        reference[name] = reference[name] + delta
    return reference


# --- bf16 rounding, from float64 ------------------------------------------------------------


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16) if tensor.element_size() == 2 else tensor.view(torch.int32)


def round_bf16(exact: torch.Tensor) -> torch.Tensor:
    """float64 -> bf16 rounded correctly (nearest, ties away from the rare double rounding that a
    float64 -> float32 -> bf16 cast can do): the cast, then its neighbour if that is nearer."""
    first = exact.to(torch.float32).to(torch.bfloat16)
    step = torch.where((first.double() < exact) == (first.double() >= 0), 1, -1)
    other = (bits(first).to(torch.int32) + step).to(torch.int16).view(torch.bfloat16)
    nearer = (other.double() - exact).abs() < (first.double() - exact).abs()
    return torch.where(nearer, other, first)


def half_ulp_bf16(value: torch.Tensor) -> torch.Tensor:
    """Half the spacing of bf16 numbers around each (non-zero) value, in float64."""
    exponent = torch.floor(torch.log2(value.double().abs().clamp_min(2.0**-126)))
    return 2.0 ** (exponent - 8)
