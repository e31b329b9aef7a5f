"""Stable Diffusion module names: kohya prefixes and components, and the dotted paths of kohya's
underscored names for the architectures whose module names are known (diffusers' UNet, the
original LDM UNet names of SDXL files, CLIP text encoders)."""

from __future__ import annotations

import re

# kohya prefix (without the trailing '_') -> the diffusers pipeline component it adapts.
# sd-scripts and LyCORIS write `lora_te` for the one text encoder of SD 1.x/2.x and the numbered
# form only when a model has several (SDXL: te1 = CLIPTextModel, te2 = ...WithProjection).
PREFIX_COMPONENTS = {
    "lora_unet": "unet",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
    "lora_te": "text_encoder",
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# the order a pipeline lists its models in (diffusers' save_lora_weights order)
COMPONENT_ORDER = ("unet", "transformer", *TEXT_ENCODERS)

# Path components of diffusers' UNet2DConditionModel (SD 1.x, 2.x, XL) that contain '_' or
# that a kohya name can reach; numbers are components of their own.
UNET_WORDS = frozenset(
    {
        "conv_in", "conv_out", "conv_norm_out", "time_embedding", "linear_1", "linear_2",
        "add_embedding", "class_embedding", "encoder_hid_proj", "down_blocks", "up_blocks",
        "mid_block", "attentions", "resnets", "downsamplers", "upsamplers", "conv",
        "transformer_blocks", "norm", "proj_in", "proj_out", "attn1", "attn2", "to_q", "to_k",
        "to_v", "to_out", "ff", "net", "proj", "norm1", "norm2", "norm3", "conv1", "conv2",
        "conv_shortcut", "time_emb_proj", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    }
)  # fmt: skip
# CLIPTextModel / CLIPTextModelWithProjection
CLIP_WORDS = frozenset(
    {
        "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj",
        "out_proj", "mlp", "fc1", "fc2", "layer_norm1", "layer_norm2", "embeddings",
        "token_embedding", "position_embedding", "final_layer_norm", "text_projection",
    }
)  # fmt: skip
# transformers >= 5 builds CLIPTextModel without the `text_model` level, so tools running there
# write `lora_te_encoder_layers_0_...`; the stored weights (and transformers 4) use text_model.
_UNDER_TEXT_MODEL = ("encoder.", "embeddings.", "final_layer_norm")

# The LDM (original Stable Diffusion) UNet names that sd-scripts' SDXL trainer writes, for the
# layout every SD UNet shares: two ResNet layers per down block, three per up block.
_LDM_START = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_")
_LDM_RESNET = {
    "in_layers_0": "norm1",
    "in_layers_2": "conv1",
    "out_layers_0": "norm2",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_LDM_TOP = {
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
    "out_0": "conv_norm_out",
    "out_2": "conv_out",
    "input_blocks_0_0": "conv_in",
}
_LAYERS_PER_DOWN_BLOCK = 2  # + 1 slot for the downsampler: input block n = 1 + 3 i + j


def split_kohya_name(name: str) -> tuple[str, str | None, str]:
    """(prefix, component, rest) of a kohya module name: `lora_unet_down_blocks_0` ->
    ("lora_unet", "unet", "down_blocks_0"); an unknown prefix gives ("lora", None, rest) or
    ("", None, name)."""
    for prefix in sorted(PREFIX_COMPONENTS, key=len, reverse=True):
        if name.startswith(prefix + "_"):
            return prefix, PREFIX_COMPONENTS[prefix], name[len(prefix) + 1 :]
    if name.startswith("lora_"):
        return "lora", None, name[len("lora_") :]
    return "", None, name


def parse_words(rest: str, words: frozenset[str]) -> str | None:
    """The dotted path for an underscored name when exactly one split into known words and
    numbers exists (`ff_net_0_proj` -> `ff.net.0.proj`), else None."""
    tokens = rest.split("_")
    if not rest or any(not t for t in tokens):
        return None
    count = len(tokens)
    # parses[i]: up to two dotted parses of tokens[i:] (two is enough to know it is ambiguous)
    parses: list[list[str]] = [[] for _ in range(count + 1)]
    parses[count] = [""]
    for start in range(count - 1, -1, -1):
        found: list[str] = []
        for stop in range(start + 1, count + 1):
            word = "_".join(tokens[start:stop])
            if not (word in words or (stop == start + 1 and word.isdigit())):
                continue
            for tail in parses[stop]:
                found.append(word + ("." + tail if tail else ""))
                if len(found) > 1:
                    break
            if len(found) > 1:
                break
        parses[start] = found
    return parses[0][0] if len(parses[0]) == 1 else None


def is_ldm_unet_name(rest: str) -> bool:
    """Whether a `lora_unet_` name uses the original LDM names (`input_blocks_4_1_...`)."""
    return bool(_LDM_START.match(rest)) or rest == "input_blocks_0_0"


def ldm_to_diffusers(rest: str) -> str | None:
    """The diffusers UNet path of an LDM-named kohya module (`input_blocks_4_1_proj_in` ->
    `down_blocks.1.attentions.0.proj_in`), or None when the name does not follow the layout."""
    if rest in _LDM_TOP:
        return _LDM_TOP[rest]
    block = re.match(r"^input_blocks_(\d+)_(\d+)(?:_(.+))?$", rest)
    if block:
        n, m, inner = int(block[1]), int(block[2]), block[3] or ""
        if n == 0:
            return None
        i, j = divmod(n - 1, _LAYERS_PER_DOWN_BLOCK + 1)
        if j == _LAYERS_PER_DOWN_BLOCK:
            return f"down_blocks.{i}.downsamplers.0.conv" if (m, inner) == (0, "op") else None
        return _ldm_layer(f"down_blocks.{i}", j, m, inner)
    block = re.match(r"^middle_block_(\d+)_(.+)$", rest)
    if block:
        n, inner = int(block[1]), block[2]
        if n == 1:
            return _attention("mid_block.attentions.0", inner)
        return _resnet(f"mid_block.resnets.{n // 2}", inner) if n in (0, 2) else None
    block = re.match(r"^output_blocks_(\d+)_(\d+)_(.+)$", rest)
    if block:
        n, m, inner = int(block[1]), int(block[2]), block[3]
        i, j = divmod(n, _LAYERS_PER_DOWN_BLOCK + 1)
        if m in (1, 2) and inner == "conv":  # [resnet, (attention,) upsampler]
            return f"up_blocks.{i}.upsamplers.0.conv"
        return _ldm_layer(f"up_blocks.{i}", j, m, inner)
    return None


def _ldm_layer(block: str, j: int, m: int, inner: str) -> str | None:
    if m == 0:
        return _resnet(f"{block}.resnets.{j}", inner)
    if m == 1:
        return _attention(f"{block}.attentions.{j}", inner)
    return None


def _resnet(stem: str, inner: str) -> str | None:
    return f"{stem}.{_LDM_RESNET[inner]}" if inner in _LDM_RESNET else None


def _attention(stem: str, inner: str) -> str | None:
    path = parse_words(inner, UNET_WORDS)
    return f"{stem}.{path}" if path else None


def kohya_module_path(component: str | None, rest: str) -> str | None:
    """The module path (in the component's own model) of a kohya name's rest, when the
    component's architecture names it unambiguously; None when they are not known."""
    if component == "unet":
        if is_ldm_unet_name(rest):
            return ldm_to_diffusers(rest)
        return parse_words(rest, UNET_WORDS)
    if component in TEXT_ENCODERS:
        path = parse_words(rest, CLIP_WORDS)
        return with_text_model(path) if path else None
    return None


def with_text_model(path: str) -> str:
    """A CLIP text-encoder path in the stored layout: `encoder.layers.0...` (how transformers
    >= 5 names CLIPTextModel's modules) -> `text_model.encoder.layers.0...`."""
    return "text_model." + path if path.startswith(_UNDER_TEXT_MODEL) else path


def kohya_prefix(component: str | None, numbered_text_encoders: bool) -> str | None:
    """The kohya prefix (without '_') for a component: `lora_te` or `lora_te1` for the first
    text encoder, by whether the model has several; None for an unknown component."""
    if component in ("unet", "transformer"):
        return "lora_unet"
    if component == "text_encoder":
        return "lora_te1" if numbered_text_encoders else "lora_te"
    if component == "text_encoder_2":
        return "lora_te2"
    if component == "text_encoder_3":
        return "lora_te3"
    return None


def kohya_body(component: str | None, path: str) -> str:
    """The underscored body of a kohya name for a module path (text encoders in the
    `text_model_` form that every kohya reader knows)."""
    if component in TEXT_ENCODERS:
        path = with_text_model(path)
    return path.replace(".", "_")
