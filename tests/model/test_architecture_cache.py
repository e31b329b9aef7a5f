"""The architecture answers kept between runs are exactly transformers' answers, are read only
when their key and every field check out, and spare a later merge importing transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from architectures import ARCHS, build_model
from helpers import FIXTURES, tree_hashes

from loramerge.model import architecture_cache
from loramerge.model.architecture import Architecture, NoArchitecture, build_architecture

SUITE = ["llama-tied", "gpt2-square", "mixtral", "qwen3-moe", "deepseek-v3", "t5", "whisper",
         "vit", "gpt-neox", "resnet"]  # fmt: skip


def _config(name: str) -> dict:
    model = build_model(next(a for a in ARCHS if a.name == name))
    config = json.loads(model.config.to_json_string())
    config["architectures"] = [type(model).__name__]
    return config


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMERGE_CACHE_DIR", str(tmp_path))
    return tmp_path / "architectures"


@pytest.mark.parametrize("name", SUITE)
def test_kept_answer_equals_transformers_answer(name, cache_dir):
    config = _config(name)
    fresh = build_architecture(config)
    assert isinstance(fresh, Architecture), fresh
    architecture_cache.store(config, fresh)
    kept = architecture_cache.load(config)
    assert kept == fresh
    for param in fresh.parameters:  # the stored pieces, and the unmapped ones' reasons
        assert _pieces(kept, param) == _pieces(fresh, param)


def _pieces(architecture: Architecture, param: str):
    try:
        return architecture.stored_pieces(param)
    except Exception as exc:
        return repr(exc)


def test_refusals_are_kept_too(cache_dir):
    config = {"model_type": "my-own", "auto_map": {"AutoModel": "x.Y"}}
    architecture_cache.store(config, build_architecture(config))
    kept = architecture_cache.load(config)
    assert isinstance(kept, NoArchitecture) and "trust_remote_code" in kept.reason


def test_another_config_or_version_misses(cache_dir, monkeypatch):
    config = _config("llama-tied")
    architecture_cache.store(config, build_architecture(config))
    assert architecture_cache.load({**config, "num_hidden_layers": 3}) is None
    monkeypatch.setattr(architecture_cache, "installed", lambda package: "0.0-other")
    assert architecture_cache.load(config) is None


def _kept_file(cache_dir):
    (found,) = cache_dir.glob("*.json")
    return found


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # cut short
        lambda text: text.replace('"model_class":"', '"model_class":7,"x":"', 1),
        lambda text: text.replace("false", '"no"', 1),  # a flag of the wrong type
        lambda text: text.replace('"format":1', '"format":2', 1),  # another key
        lambda text: json.dumps({"key": None, "value": {"reason": "forged"}}),
        lambda text: text.replace('"tied":[', '"tied":[["nowhere","lm_head.weight"],', 1),
        lambda text: "[" * 100_000,
    ],
)
def test_damaged_or_foreign_files_are_misses(damage, cache_dir):
    config = _config("llama-tied")
    fresh = build_architecture(config)
    architecture_cache.store(config, fresh)
    kept = _kept_file(cache_dir)
    kept.write_text(damage(kept.read_text()))
    assert architecture_cache.load(config) is None
    architecture_cache.store(config, fresh)  # what a merge does on a miss
    assert architecture_cache.load(config) == fresh


def test_empty_folder_setting_turns_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMERGE_CACHE_DIR", "")
    config = _config("llama-tied")
    architecture_cache.store(config, build_architecture(config))
    assert architecture_cache.load(config) is None
    assert not list(tmp_path.iterdir())


def test_a_later_merge_does_not_import_transformers(tmp_path):
    script = (
        "import sys\n"
        "from loramerge.jobs.merge import merge\n"
        "merge(sys.argv[1], sys.argv[2], sys.argv[3])\n"
        "print('transformers' in sys.modules)\n"
    )
    env = {**os.environ, "LORAMERGE_CACHE_DIR": str(tmp_path / "cache")}
    adapter, base = FIXTURES / "adapters" / "llama-lora", FIXTURES / "bases" / "llama"
    found = []
    for run in range(2):
        out = tmp_path / f"merged-{run}"
        command = [sys.executable, "-c", script, str(adapter), str(base), str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        found.append(done.stdout.split()[-1])
    assert found == ["True", "False"]
    assert tree_hashes(tmp_path / "merged-0") == tree_hashes(tmp_path / "merged-1")
