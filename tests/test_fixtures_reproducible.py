"""The fixtures are real data: check they rebuild byte for byte and load with the real libraries.

- the rebuild tests (marked slow, ~20 s on 2 cores) run fixtures/make_fixtures.py once into a
  temporary folder. With any library versions, the rebuilt files must have the committed
  tensors' names, dtypes and shapes and the same configs (bar transformers_version); with the
  versions MANIFEST.json records they must also match every sha256 there (other versions
  legitimately initialise and train differently, so that part is skipped for them).
- the other tests are quick sanity checks on the committed fixtures: bases load with no
  missing/unexpected keys, adapters load with PEFT and round-trip, no lora_B is zero, and the
  kohya file matches the PEFT adapter it was converted from.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loramerge.io.safetensors_header import read_header

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SCRIPT = FIXTURES / "make_fixtures.py"
MANIFEST = FIXTURES / "MANIFEST.json"

BASES = ["llama", "llama-tied", "gpt2"]
ADAPTERS = [
    "llama-lora",
    "llama-rslora-patterns",
    "llama-dora",
    "llama-tied-embedding",
    "llama-modules-to-save",
    "llama-tied-modules-to-save",
    "gpt2-lora",
    "gpt2-dora",
]


def _manifest() -> dict:
    if not MANIFEST.is_file():
        pytest.skip("fixtures/MANIFEST.json missing: run `python fixtures/make_fixtures.py`")
    return json.loads(MANIFEST.read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _base_dir(base_id: str) -> Path:
    """'fixtures/bases/llama' -> <repo>/fixtures/bases/llama"""
    assert base_id.startswith("fixtures/"), base_id
    return FIXTURES / base_id[len("fixtures/") :]


def _lora_b_keys(keys) -> list[str]:
    return [k for k in keys if ".lora_B." in k or k.endswith(".lora_B") or ".lora_embedding_B" in k]


# ---------------------------------------------------------------- reproducibility


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    """fixtures/make_fixtures.py run once into a temporary folder, from another directory."""
    out = tmp_path_factory.mktemp("rebuilt") / "fixtures"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        cwd=str(out.parent),  # must not depend on the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"make_fixtures.py failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _differing_versions() -> dict[str, tuple[str, str]]:
    recorded = _manifest()["versions"]
    installed = {name: importlib.import_module(name).__version__ for name in recorded}
    return {n: (recorded[n], installed[n]) for n in recorded if recorded[n] != installed[n]}


def _tensor_layout(path: Path) -> dict:
    """Names, dtypes and shapes of a checkpoint's tensors (and a safetensors file's metadata)."""
    if path.suffix == ".safetensors":
        header = read_header(path)
        tensors = {name: (e.dtype, list(e.shape)) for name, e in header.entries.items()}
        return {"tensors": tensors, "metadata": header.metadata}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (str(v.dtype), list(v.shape)) for k, v in state.items()}


def _without_library_version(path: Path) -> object:
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data.pop("transformers_version", None)
    return data


@pytest.mark.slow
def test_fixtures_rebuild_with_the_same_layout(rebuilt):
    """Whatever the installed library versions: the script still runs and writes the same
    files, the same tensors (names, dtypes, shapes) and the same configs."""
    expected = _manifest()["files"]
    assert sorted(json.loads((rebuilt / "MANIFEST.json").read_text())["files"]) == list(expected)
    for rel in expected:
        old, new = FIXTURES / rel, rebuilt / rel
        if old.suffix in (".safetensors", ".bin"):
            assert _tensor_layout(new) == _tensor_layout(old), rel
        elif old.suffix == ".json":
            assert _without_library_version(new) == _without_library_version(old), rel
        else:
            assert new.read_bytes() == old.read_bytes(), rel
    # The hand-written inputs are read from fixtures/text, never regenerated.
    for name in ("train.txt", "eval.txt"):
        assert (rebuilt / "text" / name).read_bytes() == (FIXTURES / "text" / name).read_bytes()


@pytest.mark.slow
def test_fixtures_rebuild_byte_identical(rebuilt):
    differing = _differing_versions()
    if differing:
        pytest.skip(
            "library versions differ from fixtures/MANIFEST.json, so the fixtures cannot be "
            "reproduced byte for byte (the layout test still ran): "
            + ", ".join(
                f"{n} {old} (recorded) != {new} (installed)"
                for n, (old, new) in sorted(differing.items())
            )
        )
    expected = _manifest()["files"]
    changed = [rel for rel in expected if _sha256(rebuilt / rel) != expected[rel]]
    assert not changed, (
        "fixtures not reproduced byte for byte (same library versions; a different CPU or BLAS "
        f"can also change float results): {changed}\n"
        "If the change is intended, rebuild with `python fixtures/make_fixtures.py`."
    )


def test_manifest_lists_every_generated_file():
    files = _manifest()["files"]
    assert list(files) == sorted(files)
    on_disk = {
        p.relative_to(FIXTURES).as_posix()
        for top in FIXTURES.iterdir()
        if top.is_dir() and top.name not in ("text", "__pycache__")
        for p in top.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert on_disk <= set(files), (
        f"generated files not in MANIFEST.json: {sorted(on_disk - set(files))}"
    )
    for rel, digest in files.items():
        assert not rel.startswith("text/") and not rel.endswith(".py") and rel != "MANIFEST.json"
        assert _sha256(FIXTURES / rel) == digest, f"{rel} does not match MANIFEST.json"


# ---------------------------------------------------------------- bases


@pytest.mark.parametrize("name", BASES)
def test_base_loads_cleanly(name):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = FIXTURES / "bases" / name
    if not folder.is_dir():
        pytest.skip(f"{folder} missing: run `python fixtures/make_fixtures.py`")
    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), output_loading_info=True, local_files_only=True
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(kind), f"{name}: {kind} {info.get(kind)}"
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert len(tok) == model.config.vocab_size
    assert tok.decode(tok("The river bends.")["input_ids"]) == "The river bends."

    cfg = json.loads((folder / "config.json").read_text())
    weight_files = sorted(p.name for p in folder.glob("*.safetensors"))
    if name == "llama":
        assert cfg["tie_word_embeddings"] is False and cfg["dtype"] == "bfloat16"
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert 2 <= len(weight_files) <= 4 and (folder / "model.safetensors.index.json").is_file()
    else:
        assert weight_files == ["model.safetensors"] and cfg["dtype"] == "float32"
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in set(f.keys())  # tied: saved once
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


# ---------------------------------------------------------------- adapters


# Expected PEFT chatter on these fixtures (tied embeddings, embedding LoRA, lora_bias).
_PEFT_NOISE = [
    "ignore:.*is_gradient_checkpointing.*:FutureWarning",
    "ignore:.*ensure_weight_tying.*:UserWarning",
    "ignore:Setting `save_embedding_layers`.*:UserWarning",
    "ignore:.*LoRA tensor\\(s\\) have invalid shape.*",
]


@pytest.mark.parametrize("name", ADAPTERS)
@pytest.mark.filterwarnings(*_PEFT_NOISE)
def test_adapter_loads_and_lora_b_nonzero(name):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = FIXTURES / "adapters" / name
    if not folder.is_dir():
        pytest.skip(f"{folder} missing: run `python fixtures/make_fixtures.py`")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    base_dir = _base_dir(cfg["base_model_name_or_path"])
    assert (base_dir / "config.json").is_file()

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    b_keys = _lora_b_keys(tensors)
    assert b_keys, f"{name}: no lora_B tensors"
    for k in b_keys:
        assert torch.count_nonzero(tensors[k]) > 0, f"{name}: {k} is all zeros"

    base = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, local_files_only=True
    )
    model = PeftModel.from_pretrained(base, str(folder))
    # Round trip: what PEFT would save from the loaded model is exactly the file.
    state = get_peft_model_state_dict(model)
    assert sorted(state) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(state[k].cpu(), v), f"{name}: {k} not loaded as stored"


def test_kohya_file_matches_peft_adapter():
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = FIXTURES / "kohya" / "llama-lora.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} missing: run `python fixtures/make_fixtures.py`")
    peft_sd = load_file(str(FIXTURES / "adapters" / "llama-lora" / "adapter_model.safetensors"))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        names = list(f.keys())  # safe_open handles are not iterable
        kohya = {k: f.get_tensor(k) for k in names}
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_args"]) == (
        "8",
        "16.0",
        "{}",
    )
    assert meta["ss_base_model_version"] == "fixtures/bases/llama"
    assert len(kohya) == 3 * len(peft_sd) // 2
    for key, a in peft_sd.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path_ = key[len("base_model.model.") : -len(".lora_A.weight")]
        name = "lora_te_" + path_.replace(".", "_")
        assert torch.equal(kohya[f"{name}.lora_down.weight"], a)
        assert torch.equal(
            kohya[f"{name}.lora_up.weight"], peft_sd[key.replace("lora_A", "lora_B")]
        )
        alpha = kohya[f"{name}.alpha"]
        assert alpha.dim() == 0 and alpha.dtype == torch.float32 and float(alpha) == 16.0
