"""Fuzzed configs and options of the readers for other tools' adapters (PEFT tuners, mlx-lm,
torchtune): whatever the values, a read either succeeds with usable modules or raises one of
loramerge's own errors, never anything else. Each test counts what it reached: reads accepted,
not only refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import BASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tool_fixtures import MLX_LM, PEFT_TUNERS, TORCHTUNE

from loramerge.adapter_checks import check_adapter
from loramerge.errors import LoramergeError
from loramerge.formats.registry import ReadOptions, read_adapter

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-5, 300)
    | st.floats(allow_nan=True)
    | st.text(max_size=5)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_numbers = (
    st.sampled_from([0, 1, 2, 3, 4, 6, 8, 12, 16, 2.5, -4, 1e308, "4", True, 10**400]) | _json
)
_FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _folder(root: Path, source: Path) -> Path:
    folder = root / source.name
    if not folder.exists():
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("reference.*", "fixture.*"))
    return folder


def _read(path: Path, options: ReadOptions | None, counts: dict[str, int]) -> None:
    """Read and check; count the reads accepted, and use every accepted module's factors."""
    counts["runs"] += 1
    try:
        adapter = read_adapter(path, options=options)
        check_adapter(adapter)
    except LoramergeError:
        return
    for module in adapter.modules.values():
        assert module.r >= 1 and math.isfinite(module.scale) and module.scale > 0
        module.factors()
    counts["accepted"] += 1


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tool-fuzz")


_tuner_changes = st.fixed_dictionaries(
    {},
    optional={
        "peft_type": st.sampled_from(["LOHA", "LOKR", "ADALORA", "VERA", "MISS", "DELORA", "IA3"])
        | _json,
        "r": _numbers,
        "alpha": _numbers,
        "lora_alpha": _numbers,
        "init_r": _numbers,
        "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "down_proj", "("]), _numbers)
        | _json,
        "alpha_pattern": st.dictionaries(st.sampled_from(["v_proj", ".*"]), _numbers) | _json,
        "init_weights": st.sampled_from([True, False, "mini", "bat"]) | _json,
        "mini_r": _numbers,
        "modules_to_save": _json,
    },
)


def test_fuzzed_tuner_configs(scratch):
    counts = {"runs": 0, "accepted": 0}
    options = ReadOptions(base=BASES / "llama")

    @_FUZZ
    @given(
        name=st.sampled_from(["adalora", "loha", "lokr-full-w1", "vera", "miss", "delora"]),
        changes=_tuner_changes,
    )
    def run(name, changes):
        folder = _folder(scratch, PEFT_TUNERS / name)
        config = json.loads((PEFT_TUNERS / name / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
        _read(folder, options, counts)

    run()
    assert counts["runs"] >= 100 and counts["accepted"] >= 10, counts


_mlx_changes = st.fixed_dictionaries(
    {},
    optional={
        "fine_tune_type": st.sampled_from(["lora", "dora", "full"]) | _json,
        "num_layers": _numbers,
        "lora_parameters": st.fixed_dictionaries(
            {},
            optional={"rank": _numbers, "scale": _numbers, "keys": _json, "alpha": _numbers},
        )
        | _json,
    },
)


def test_fuzzed_mlx_configs(scratch):
    counts = {"runs": 0, "accepted": 0}

    @_FUZZ
    @given(name=st.sampled_from(["lora", "dora", "lora-scale"]), changes=_mlx_changes)
    def run(name, changes):
        folder = _folder(scratch, MLX_LM / name)
        config = json.loads((MLX_LM / name / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
        _read(folder, None, counts)

    run()
    assert counts["runs"] >= 100 and counts["accepted"] >= 10, counts


# mostly the real values (4 heads, 2 kv heads, 64 wide, alpha 4), so that reads are also
# accepted, not only refused
def _mostly(*valid: object) -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid), _numbers
    )


_model_changes = st.fixed_dictionaries(
    {},
    optional={
        "model_type": st.sampled_from(["llama", "mistral", "qwen2"]) | _json,
        "num_attention_heads": _mostly(4, 2, 8),
        "num_key_value_heads": _mostly(2, 4, 1),
        "hidden_size": _mostly(64, 32),
        "head_dim": _mostly(16, None),
    },
)
_side_config = st.fixed_dictionaries(
    {}, optional={"r": _mostly(4, 8), "lora_alpha": _mostly(4.0, 4)}
)


def test_fuzzed_torchtune_side_files(scratch):
    counts = {"runs": 0, "accepted": 0}
    folder = scratch / "torchtune"
    folder.mkdir(exist_ok=True)
    weights = folder / "adapter_model.pt"
    shutil.copyfile(TORCHTUNE / "dora" / "adapter_model.pt", weights)
    base_config = json.loads((TORCHTUNE / "base" / "config.json").read_text())

    @_FUZZ
    @given(
        config=_side_config | _side_config | _json,
        model=_model_changes,
        alpha=st.sampled_from([None, None, None, 4.0, 8.0, -1.0, float("inf"), float("nan")]),
    )
    def run(config, model, alpha):
        (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
        (folder / "config.json").write_text(json.dumps({**base_config, **model}, allow_nan=True))
        _read(weights, ReadOptions(alpha=alpha), counts)

    run()
    assert counts["runs"] >= 100 and counts["accepted"] >= 5, counts
