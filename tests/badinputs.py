"""A corpus of bad inputs, each built from the fixtures into a scratch folder with the message the
CLI must give for it.

`build(name, root)` writes one case under `root` and returns a `Case`: the adapter and base to
pass, the substrings the single `error:` line must hold (always including the file at fault),
and which commands it applies to. Files are modified with the `safetensors` package or raw
bytes, never with loramerge's own writer, so a bug there cannot hide a bug here.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from helpers import ADAPTERS, BASES, FIXTURES
from safetensors.torch import load_file, save_file

KOHYA = FIXTURES / "kohya" / "llama-lora.safetensors"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
INDEX = "model.safetensors.index.json"
PREFIX = "base_model.model."
Q_PROJ = "model.layers.0.self_attn.q_proj"


@dataclass(frozen=True)
class Case:
    """One bad input: what to pass and what the one error line must say."""

    adapter: Path
    base: Path
    needles: tuple[str, ...]
    # the base is where the fault is (or where it shows): inspect and convert get --base too
    needs_base: bool = False
    # refused unless --allow-nonfinite, with which merge and convert succeed
    nonfinite: bool = False
    # a file whose existence would prove that something in the input was executed
    marker: Path | None = None
    # a sound adapter for the same base (the other side of `verify`)
    good: Path = ADAPTERS / "llama-lora"
    # the fault is in the base itself: commands that read no adapter of ours see it too
    base_fault: bool = False
    # commands that refuse this input for another, earlier reason: their own needles
    overrides: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def needles_for(self, command: str) -> tuple[str, ...]:
        return dict(self.overrides).get(command, self.needles)


def _peft(root: Path, name: str = "llama-lora") -> Path:
    folder = root / f"adapter-{name}"
    shutil.copytree(ADAPTERS / name, folder)
    return folder


def _base(root: Path, name: str = "llama") -> Path:
    folder = root / f"base-{name}"
    shutil.copytree(BASES / name, folder)
    return folder


def _edit_config(folder: Path, **changes: object) -> Path:
    path = folder / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return path


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _truncate(path: Path, drop: int = 100) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - drop)


# --- adapter files that are damaged ---------------------------------------------------------


def truncated_safetensors(root: Path) -> Case:
    folder = _peft(root)
    _truncate(folder / WEIGHTS)
    return Case(folder, BASES / "llama", (str(folder / WEIGHTS), "truncated"))


def truncated_kohya(root: Path) -> Case:
    path = root / "truncated.safetensors"
    shutil.copyfile(KOHYA, path)
    _truncate(path)
    return Case(path, BASES / "llama", (str(path), "truncated"))


def corrupt_header(root: Path) -> Case:
    folder = _peft(root)
    raw = bytearray((folder / WEIGHTS).read_bytes())
    raw[8:40] = b"\xff" * 32  # the JSON's first bytes
    (folder / WEIGHTS).write_bytes(bytes(raw))
    return Case(folder, BASES / "llama", (str(folder / WEIGHTS), "not valid JSON"))


def huge_header_length(root: Path) -> Case:
    folder = _peft(root)
    raw = bytearray((folder / WEIGHTS).read_bytes())
    raw[:8] = struct.pack("<q", -8)  # a negative length read as unsigned: about 2**64
    (folder / WEIGHTS).write_bytes(bytes(raw))
    return Case(folder, BASES / "llama", (str(folder / WEIGHTS), "100 MB limit"))


def duplicate_tensor_name(root: Path) -> Case:
    folder = _peft(root)
    (folder / WEIGHTS).unlink()
    entry = '{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}'
    name = f"{PREFIX}{Q_PROJ}.lora_A.weight"
    header = f'{{"{name}":{entry},"{name}":{entry}}}'.encode()
    _raw_safetensors(folder / WEIGHTS, header, b"\0" * 8)
    return Case(folder, BASES / "llama", (str(folder / WEIGHTS), "twice", name))


def empty_adapter(root: Path) -> Case:
    folder = _peft(root)
    (folder / WEIGHTS).unlink()
    _raw_safetensors(folder / WEIGHTS, b'{"__metadata__":{"format":"pt"}}')
    return Case(folder, BASES / "llama", (str(folder / WEIGHTS), "no LoRA tensors"))


def pickle_runs_code(root: Path) -> Case:
    """A legacy adapter_model.bin whose unpickling would run a shell command."""
    folder = _peft(root)
    (folder / WEIGHTS).unlink()
    marker = root / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save(
        {f"{PREFIX}{Q_PROJ}.lora_A.weight": torch.zeros(8, 64), "x": Payload()},
        folder / "adapter_model.bin",
    )
    return Case(
        folder,
        BASES / "llama",
        (str(folder / "adapter_model.bin"), "refused", "system", "never runs code"),
        marker=marker,
    )


def pickle_calls_eval(root: Path) -> Case:
    """A hand-written pickle that calls builtins.eval on an expression creating a file."""
    folder = _peft(root)
    (folder / WEIGHTS).unlink()
    marker = root / "eval-ran"
    expression = f"open({str(marker)!r}, 'w').close()"
    # GLOBAL builtins.eval, MARK, UNICODE expr, TUPLE, REDUCE, STOP
    payload = b"cbuiltins\neval\n(V" + expression.encode() + b"\ntR."
    (folder / "adapter_model.bin").write_bytes(payload)
    return Case(
        folder,
        BASES / "llama",
        (str(folder / "adapter_model.bin"), "refused", "eval"),
        marker=marker,
    )


def adapter_is_a_fifo(root: Path) -> Case:
    """A named pipe with no writer: opening it plainly would block forever."""
    path = root / "adapter.safetensors"
    os.mkfifo(path)
    return Case(path, BASES / "llama", (str(path), "not a regular file"))


def unknown_format_folder(root: Path) -> Case:
    folder = root / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an adapter\n")
    return Case(folder, BASES / "llama", (str(folder), "not an adapter loramerge recognises"))


def unknown_format_file(root: Path) -> Case:
    path = root / "weights.npz"
    path.write_bytes(b"PK\x03\x04 not really")
    return Case(path, BASES / "llama", (str(path), "not an adapter loramerge recognises"))


# --- adapter configs that are wrong ---------------------------------------------------------


def invalid_json_config(root: Path) -> Case:
    folder = _peft(root)
    (folder / CONFIG).write_text('{"r": 8, "lora_alpha": ')
    return Case(folder, BASES / "llama", (str(folder / CONFIG), "not valid JSON"))


def duplicate_config_key(root: Path) -> Case:
    folder = _peft(root)
    text = (folder / CONFIG).read_text()
    (folder / CONFIG).write_text(text.replace('"r": 8,', '"r": 8, "r": 4,'))
    return Case(folder, BASES / "llama", (str(folder / CONFIG), "'r' twice"))


def rank_disagrees(root: Path) -> Case:
    folder = _peft(root)
    path = _edit_config(folder, r=4)
    return Case(folder, BASES / "llama", (str(path), "module model.layers.", "rank 4", "rank 8"))


def rank_pattern_not_a_number(root: Path) -> Case:
    folder = _peft(root)
    path = _edit_config(folder, rank_pattern={"q_proj": "eight"})
    return Case(folder, BASES / "llama", (str(path), "rank_pattern", "'eight'"))


def fractional_rank(root: Path) -> Case:
    folder = _peft(root)
    path = _edit_config(folder, r=7.5)
    return Case(folder, BASES / "llama", (str(path), "r must be a positive whole number", "7.5"))


def zero_alpha(root: Path) -> Case:
    folder = _peft(root)
    path = _edit_config(folder, lora_alpha=0)
    return Case(folder, BASES / "llama", (str(path), "lora_alpha must be a positive number"))


def negative_alpha(root: Path) -> Case:
    folder = _peft(root)
    path = _edit_config(folder, lora_alpha=-16)
    return Case(folder, BASES / "llama", (str(path), "lora_alpha", "-16"))


def infinite_alpha(root: Path) -> Case:
    folder = _peft(root)
    path = folder / CONFIG
    path.write_text(path.read_text().replace('"lora_alpha": 16', '"lora_alpha": Infinity'))
    return Case(folder, BASES / "llama", (str(path), "lora_alpha", "inf"))


def kohya_alpha_not_a_scalar(root: Path) -> Case:
    path = root / "alpha.safetensors"
    shutil.copyfile(KOHYA, path)
    name = "lora_te_model_layers_0_self_attn_q_proj"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{name}.alpha"] = torch.tensor([16.0, 16.0])

    _edit_tensors(path, edit)
    return Case(path, BASES / "llama", (str(path), name, "alpha must hold one number"))


# --- adapter values that are wrong ----------------------------------------------------------


def nan_in_adapter(root: Path) -> Case:
    folder = _peft(root)

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{PREFIX}{Q_PROJ}.lora_A.weight"][0, 3] = float("nan")

    _edit_tensors(folder / WEIGHTS, edit)
    return Case(
        folder, BASES / "llama", (str(folder), Q_PROJ, "lora_A", "NaN or Inf"), nonfinite=True
    )


def inf_in_kohya(root: Path) -> Case:
    path = root / "inf.safetensors"
    shutil.copyfile(KOHYA, path)

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors["lora_te_model_layers_1_mlp_up_proj.lora_up.weight"][2, 1] = float("-inf")

    _edit_tensors(path, edit)
    return Case(
        path, BASES / "llama", (str(path), "up_proj", "lora_B", "NaN or Inf"), nonfinite=True
    )


def another_base(root: Path) -> Case:
    """q_proj's A is 3 columns wider than the base's hidden size: trained for another base."""
    folder = _peft(root)

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        key = f"{PREFIX}{Q_PROJ}.lora_A.weight"
        tensors[key] = torch.cat([tensors[key], torch.zeros(8, 3)], dim=1)

    _edit_tensors(folder / WEIGHTS, edit)
    return Case(
        folder,
        BASES / "llama",
        (str(folder), Q_PROJ, "[64, 64]", "[64, 67]", "another base model"),
        needs_base=True,
    )


def module_base_lacks(root: Path) -> Case:
    folder = _peft(root)
    missing = "model.layers.9.self_attn.q_proj"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for part in ("lora_A", "lora_B"):
            tensors[f"{PREFIX}{missing}.{part}.weight"] = tensors[
                f"{PREFIX}{Q_PROJ}.{part}.weight"
            ].clone()

    _edit_tensors(folder / WEIGHTS, edit)
    return Case(folder, BASES / "llama", (str(folder), missing, "has no module"), needs_base=True)


def lora_bias_wrong_length(root: Path) -> Case:
    folder = _peft(root, "gpt2-lora")
    module = "transformer.h.0.attn.c_attn"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{PREFIX}{module}.lora_B.bias"] = torch.zeros(5)

    _edit_tensors(folder / WEIGHTS, edit)
    return Case(
        folder,
        BASES / "gpt2",
        (str(folder), module, "lora_B.bias [5]"),
        needs_base=True,
        good=ADAPTERS / "gpt2-lora",
    )


def modules_to_save_wrong_shape(root: Path) -> Case:
    folder = _peft(root, "llama-modules-to-save")

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{PREFIX}lm_head.weight"] = torch.zeros(320, 48)

    _edit_tensors(folder / WEIGHTS, edit)
    return Case(
        folder,
        BASES / "llama",
        (str(folder), "lm_head.weight", "[320, 64]", "[320, 48]"),
        needs_base=True,
        good=ADAPTERS / "llama-modules-to-save",
        # fold takes plain LoRA links only and says so before looking at shapes
        overrides=(("fold", (str(folder), "only plain LoRA links")),),
    )


# --- bases that are damaged or escape their folder ------------------------------------------


def index_missing_shard(root: Path) -> Case:
    base = _base(root)
    (base / "model-00002-of-00003.safetensors").unlink()
    return Case(
        ADAPTERS / "llama-lora",
        base,
        (str(base / INDEX), "model-00002-of-00003.safetensors", "does not exist"),
        needs_base=True,
        base_fault=True,
        good=ADAPTERS / "llama-lora",
    )


def _edit_index(base: Path, shard: str) -> None:
    path = base / INDEX
    index = json.loads(path.read_text())
    old = "model-00002-of-00003.safetensors"
    index["weight_map"] = {k: (shard if v == old else v) for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))


def _index_escape(base: Path, message: str) -> Case:
    """A good adapter on a base whose index points a shard outside the folder."""
    return Case(
        ADAPTERS / "llama-lora",
        base,
        (str(base / INDEX), message),
        needs_base=True,
        base_fault=True,
        good=ADAPTERS / "llama-lora",
    )


def index_dotdot(root: Path) -> Case:
    base = _base(root)
    shutil.copyfile(base / "model-00002-of-00003.safetensors", root / "outside.safetensors")
    _edit_index(base, "../outside.safetensors")
    return _index_escape(base, "leaves the model folder")


def index_absolute(root: Path) -> Case:
    base = _base(root)
    outside = root / "outside-abs.safetensors"
    shutil.copyfile(base / "model-00002-of-00003.safetensors", outside)
    _edit_index(base, str(outside))
    return _index_escape(base, "leaves the model folder")


def index_symlink_out(root: Path) -> Case:
    base = _base(root)
    shard = base / "model-00002-of-00003.safetensors"
    outside = root / "outside-link.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    return _index_escape(base, "links outside")


def base_config_invalid(root: Path) -> Case:
    base = _base(root, "llama-tied")
    (base / "config.json").write_text("{'model_type': 'llama'}")
    return Case(
        ADAPTERS / "llama-tied-embedding",
        base,
        (str(base / "config.json"), "not valid JSON"),
        needs_base=True,
        base_fault=True,
        good=ADAPTERS / "llama-tied-embedding",
    )


def base_config_is_a_fifo(root: Path) -> Case:
    base = _base(root)
    (base / "config.json").unlink()
    os.mkfifo(base / "config.json")
    return Case(
        ADAPTERS / "llama-lora",
        base,
        (str(base / "config.json"), "not a regular file"),
        needs_base=True,
        base_fault=True,
    )


def base_shard_truncated(root: Path) -> Case:
    base = _base(root)
    shard = base / "model-00003-of-00003.safetensors"
    _truncate(shard, 7)
    return Case(
        ADAPTERS / "llama-lora",
        base,
        (str(shard), "truncated"),
        needs_base=True,
        base_fault=True,
        good=ADAPTERS / "llama-lora",
    )


def base_is_a_file(root: Path) -> Case:
    path = root / "model.safetensors"
    shutil.copyfile(BASES / "llama-tied" / "model.safetensors", path)
    return Case(
        ADAPTERS / "llama-tied-embedding",
        path,
        (str(path), "is a file"),
        needs_base=True,
        base_fault=True,
        good=ADAPTERS / "llama-tied-embedding",
    )


# --- other tools' adapters: PEFT tuners, mlx-lm, torchtune ------------------------------------

TUNERS = FIXTURES / "peft-tuners"
MLX = FIXTURES / "mlx-lm"
TORCHTUNE = FIXTURES / "torchtune"


def _copy(root: Path, source: Path) -> Path:
    folder = root / f"adapter-{source.parent.name}-{source.name}"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("reference.*", "fixture.json"))
    return folder


def loha_truncated(root: Path) -> Case:
    folder = _copy(root, TUNERS / "loha")
    _truncate(folder / WEIGHTS)
    return Case(folder, BASES / "llama", (str(folder / WEIGHTS), "truncated"))


def loha_missing_factor(root: Path) -> Case:
    folder = _copy(root, TUNERS / "loha")

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[f"{PREFIX}{Q_PROJ}.hada_w2_b"]

    _edit_tensors(folder / WEIGHTS, edit)
    return Case(folder, BASES / "llama", (str(folder / WEIGHTS), Q_PROJ, "no hada_w2_b"))


def loha_rank_disagrees(root: Path) -> Case:
    folder = _copy(root, TUNERS / "loha")
    path = _edit_config(folder, r=3)
    return Case(folder, BASES / "llama", (str(path), "rank 3", "rank 4"))


def loha_stray_tensor(root: Path) -> Case:
    folder = _copy(root, TUNERS / "loha")

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{PREFIX}{Q_PROJ}.lora_A.weight"] = torch.zeros(4, 64)

    _edit_tensors(folder / WEIGHTS, edit)
    return Case(folder, BASES / "llama", (str(folder / WEIGHTS), "lora_A", "not a LOHA parameter"))


def lokr_half_a_side(root: Path) -> Case:
    folder = _copy(root, TUNERS / "lokr-factorised")

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[f"{PREFIX}{Q_PROJ}.lokr_w1_b"]

    _edit_tensors(folder / WEIGHTS, edit)
    return Case(folder, BASES / "llama", (str(folder / WEIGHTS), Q_PROJ, "lokr_w1_a and lokr_w1_b"))


def adalora_mask_wrong_length(root: Path) -> Case:
    folder = _copy(root, TUNERS / "adalora")
    config = json.loads((folder / CONFIG).read_text())
    config["rank_pattern"][f"{Q_PROJ}.lora_E"] = [True] * 5
    path = _edit_config(folder, rank_pattern=config["rank_pattern"])
    return Case(folder, BASES / "llama", (str(path), Q_PROJ, "6 booleans (init_r)"))


def vera_without_projections(root: Path) -> Case:
    folder = _copy(root, TUNERS / "vera")

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["base_model.vera_A"], tensors["base_model.vera_B"]

    _edit_tensors(folder / WEIGHTS, edit)
    return Case(
        folder, BASES / "llama", (str(folder / WEIGHTS), "no shared vera_A", "save_projection")
    )


def ia3_scale_on_the_wrong_side(root: Path) -> Case:
    """down_proj is a feedforward module: its ia3_l scales inputs, (1, in), not outputs."""
    folder = _copy(root, TUNERS / "ia3")
    key = f"{PREFIX}model.layers.1.mlp.down_proj.ia3_l"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = torch.ones(64, 1)

    _edit_tensors(folder / WEIGHTS, edit)
    return Case(
        folder, BASES / "llama", (str(folder / WEIGHTS), "ia3_l [64, 1]", "scale per inputs")
    )


def mlx_truncated(root: Path) -> Case:
    folder = _copy(root, MLX / "lora")
    _truncate(folder / "adapters.safetensors")
    return Case(folder, BASES / "llama", (str(folder / "adapters.safetensors"), "truncated"))


def mlx_rank_disagrees(root: Path) -> Case:
    folder = _copy(root, MLX / "lora")
    config = json.loads((folder / CONFIG).read_text())
    config["lora_parameters"]["rank"] = 8
    _edit_config(folder, lora_parameters=config["lora_parameters"])
    return Case(
        folder, BASES / "llama", (str(folder / "adapters.safetensors"), "rank is 8", "rank 4")
    )


def mlx_dora_without_magnitudes(root: Path) -> Case:
    folder = _copy(root, MLX / "lora")
    _edit_config(folder, fine_tune_type="dora")
    return Case(
        folder, BASES / "llama", (str(folder / "adapters.safetensors"), "no DoRA magnitude m")
    )


def mlx_nan(root: Path) -> Case:
    folder = _copy(root, MLX / "lora")
    module = "model.layers.3.self_attn.q_proj"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{module}.lora_a"][5, 1] = float("nan")

    _edit_tensors(folder / "adapters.safetensors", edit)
    return Case(
        folder, BASES / "llama", (str(folder), module, "lora_A", "NaN or Inf"), nonfinite=True
    )


def torchtune_without_alpha(root: Path) -> Case:
    path = root / "adapter_model.pt"
    shutil.copyfile(TORCHTUNE / "lora" / "adapter_model.pt", path)
    return Case(path, TORCHTUNE / "base", (str(path), "stores no lora_alpha", "--alpha"))


def torchtune_unknown_module(root: Path) -> Case:
    folder = _copy(root, TORCHTUNE / "lora")
    path = folder / "adapter_model.pt"
    tensors = torch.load(path, weights_only=True)
    tensors["tok_embeddings.lora_a.weight"] = torch.zeros(4, 320)
    torch.save(tensors, path)
    return Case(path, TORCHTUNE / "base", (str(path), "tok_embeddings.lora_a.weight", "torchtune"))


def torchtune_truncated(root: Path) -> Case:
    path = root / "adapter_model.pt"
    shutil.copyfile(TORCHTUNE / "lora" / "adapter_model.pt", path)
    _truncate(path, 2000)
    return Case(path, TORCHTUNE / "base", (str(path), "cannot be read as a torch file"))


def torchtune_pickle_runs_code(root: Path) -> Case:
    """torchtune's key names, and a value whose unpickling would create a file."""
    path = root / "adapter_model.pt"
    marker = root / "torchtune-pickle-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.zeros(4, 64), "x": Payload()}, path)
    return Case(path, TORCHTUNE / "base", (str(path), "refused", "never runs code"), marker=marker)


# --- Stable Diffusion adapters: LyCORIS, kohya pipelines, diffusers -------------------------

LYCORIS = FIXTURES / "lycoris"
DIFFUSERS_FILE = FIXTURES / "diffusers" / "sd1-peft-keys" / "pytorch_lora_weights.safetensors"
TE_FC1 = "lora_te_encoder_layers_0_mlp_fc1"


def _sd_copy(root: Path, source: Path, name: str, edit, metadata=None) -> Path:
    """A copy of an SD fixture file with its tensors (and optionally metadata) edited."""
    from safetensors import safe_open

    with safe_open(source, "pt") as handle:
        kept = handle.metadata() or {}
    tensors = load_file(source)
    edit(tensors)
    path = root / name
    save_file(tensors, path, metadata=kept if metadata is None else metadata)
    return path


def lycoris_loha_part_missing(root: Path) -> Case:
    def edit(tensors):
        del tensors[f"{TE_FC1}.hada_w2_b"]

    path = _sd_copy(root, LYCORIS / "loha.safetensors", "loha.safetensors", edit)
    return Case(path, BASES / "llama", (str(path), TE_FC1, "no hada_w2_b"))


def lycoris_lokr_shapes(root: Path) -> Case:
    def edit(tensors):
        tensors[f"{TE_FC1}.lokr_w1_b"] = torch.zeros(3, 4)  # rank 3 against lokr_w1_a's 2

    path = _sd_copy(root, LYCORIS / "lokr-factored.safetensors", "lokr.safetensors", edit)
    return Case(path, BASES / "llama", (str(path), TE_FC1, "do not fit"))


def lycoris_oft(root: Path) -> Case:
    def edit(tensors):
        tensors["lora_unet_conv_in.oft_blocks"] = torch.zeros(2, 4, 4)

    path = _sd_copy(root, LYCORIS / "locon.safetensors", "oft.safetensors", edit)
    return Case(path, BASES / "llama", (str(path), "lora_unet_conv_in", "OFT", "no LoRA form"))


def lycoris_dora_input_norm(root: Path) -> Case:
    def edit(tensors):
        tensors[f"{TE_FC1}.dora_scale"] = torch.ones(1, 32)

    path = _sd_copy(root, LYCORIS / "locon-dora.safetensors", "dora.safetensors", edit)
    return Case(path, BASES / "llama", (str(path), TE_FC1, "wd_on_output=False"))


def lycoris_dylora_block_size(root: Path) -> Case:
    source = LYCORIS / "dylora.safetensors"
    from safetensors import safe_open

    with safe_open(source, "pt") as handle:
        metadata = dict(handle.metadata())
    args = json.loads(metadata["ss_network_args"])
    args["block_size"] = "three"
    metadata["ss_network_args"] = json.dumps(args)
    path = _sd_copy(root, source, "dylora.safetensors", lambda tensors: None, metadata)
    return Case(path, BASES / "llama", (str(path), "block_size", "'three'"))


def lycoris_proj_kind_unknown(root: Path) -> Case:
    """A LoHa file without its metadata: nothing says whether proj_in is a 1x1 conv."""
    path = _sd_copy(root, LYCORIS / "loha.safetensors", "bare.safetensors", lambda t: None, {})
    return Case(path, BASES / "llama", (str(path), "proj_in", "ss_base_model_version"))


def kohya_and_lycoris_at_once(root: Path) -> Case:
    metadata = {"ss_network_module": "networks.lora"}

    def edit(tensors):
        tensors["lora_unet_conv_in.lora_down.weight"] = torch.zeros(1, 4, 3, 3)
        tensors["lora_unet_conv_in.lora_up.weight"] = torch.zeros(8, 1, 1, 1)

    path = _sd_copy(root, LYCORIS / "loha.safetensors", "both.safetensors", edit, metadata)
    return Case(path, BASES / "llama", (str(path), "claimed by kohya and lycoris"))


def kohya_sd_one_module_twice(root: Path) -> Case:
    """The same text-encoder layer named with and without transformers 4's `text_model_`."""

    def edit(tensors):
        for part in ("lora_down.weight", "lora_up.weight", "alpha"):
            long = tensors[f"lora_te_text_model_encoder_layers_0_mlp_fc1.{part}"]
            tensors[f"{TE_FC1}.{part}"] = long.clone()

    path = _sd_copy(root, FIXTURES / "kohya-sd" / "sd1-lora.safetensors", "twice.safetensors", edit)
    return Case(path, BASES / "llama", (str(path), TE_FC1, "same module"))


def diffusers_metadata_not_json(root: Path) -> Case:
    from safetensors import safe_open

    with safe_open(DIFFUSERS_FILE, "pt") as handle:
        metadata = dict(handle.metadata())
    metadata["lora_adapter_metadata"] = '{"unet.r": 4,'
    path = _sd_copy(root, DIFFUSERS_FILE, "pytorch_lora_weights.safetensors", lambda t: None,
                    metadata)  # fmt: skip
    return Case(path, BASES / "llama", (str(path), "lora_adapter_metadata", "not valid JSON"))


def diffusers_rank_disagrees(root: Path) -> Case:
    from safetensors import safe_open

    with safe_open(DIFFUSERS_FILE, "pt") as handle:
        metadata = dict(handle.metadata())
    flat = json.loads(metadata["lora_adapter_metadata"])
    flat.update({"unet.r": 7, "unet.rank_pattern": {}})
    metadata["lora_adapter_metadata"] = json.dumps(flat)
    folder = root / "diffusers"
    folder.mkdir()
    _sd_copy(folder, DIFFUSERS_FILE, "pytorch_lora_weights.safetensors", lambda t: None, metadata)
    return Case(folder, BASES / "llama", (str(folder), "unet.", "rank 7"))


def diffusers_stray_key(root: Path) -> Case:
    def edit(tensors):
        tensors["unet.conv_in.weight"] = torch.zeros(8, 4, 3, 3)

    path = _sd_copy(root, DIFFUSERS_FILE, "pytorch_lora_weights.safetensors", edit)
    return Case(path, BASES / "llama", (str(path), "unet.conv_in.weight", "not a diffusers LoRA"))


BUILDERS: dict[str, Callable[[Path], Case]] = {
    fn.__name__.replace("_", "-"): fn
    for fn in (
        truncated_safetensors,
        truncated_kohya,
        corrupt_header,
        huge_header_length,
        duplicate_tensor_name,
        empty_adapter,
        pickle_runs_code,
        pickle_calls_eval,
        adapter_is_a_fifo,
        unknown_format_folder,
        unknown_format_file,
        invalid_json_config,
        duplicate_config_key,
        rank_disagrees,
        rank_pattern_not_a_number,
        fractional_rank,
        zero_alpha,
        negative_alpha,
        infinite_alpha,
        kohya_alpha_not_a_scalar,
        nan_in_adapter,
        inf_in_kohya,
        another_base,
        module_base_lacks,
        lora_bias_wrong_length,
        modules_to_save_wrong_shape,
        index_missing_shard,
        index_dotdot,
        index_absolute,
        index_symlink_out,
        base_config_invalid,
        base_config_is_a_fifo,
        base_shard_truncated,
        base_is_a_file,
        loha_truncated,
        loha_missing_factor,
        loha_rank_disagrees,
        loha_stray_tensor,
        lokr_half_a_side,
        adalora_mask_wrong_length,
        vera_without_projections,
        ia3_scale_on_the_wrong_side,
        mlx_truncated,
        mlx_rank_disagrees,
        mlx_dora_without_magnitudes,
        mlx_nan,
        torchtune_without_alpha,
        torchtune_unknown_module,
        torchtune_truncated,
        torchtune_pickle_runs_code,
        lycoris_loha_part_missing,
        lycoris_lokr_shapes,
        lycoris_oft,
        lycoris_dora_input_norm,
        lycoris_dylora_block_size,
        lycoris_proj_kind_unknown,
        kohya_and_lycoris_at_once,
        kohya_sd_one_module_twice,
        diffusers_metadata_not_json,
        diffusers_rank_disagrees,
        diffusers_stray_key,
    )
}


def build(name: str, root: Path) -> Case:
    """Write case `name` under `root` (an empty scratch folder) and describe it."""
    root.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](root)
