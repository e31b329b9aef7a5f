"""Fuzzed Stable Diffusion adapters (LyCORIS, kohya pipelines, diffusers): tensors dropped,
reshaped, renamed or added, metadata garbled. Every input is read and its factors computed, or
refused with loramerge's own error; nothing else escapes. The fuzzer must reach both."""

from __future__ import annotations

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sd_fixtures import FIXTURES

from loramerge.adapter_checks import check_adapter
from loramerge.errors import LoramergeError
from loramerge.formats.registry import read_adapter

SOURCES = [
    FIXTURES / "lycoris" / f"{name}.safetensors"
    for name in (
        "loha",
        "loha-tucker",
        "lokr-factored",
        "lokr-tucker",
        "locon-tucker",
        "full",
        "dylora",
        "locon-dora",
    )
] + [
    FIXTURES / "kohya-sd" / "sdxl-te1te2-lora.safetensors",
    FIXTURES / "diffusers" / "sdxl-converted-keys" / "pytorch_lora_weights.safetensors",
]
PARTS = [
    "hada_w1_a",
    "hada_w2_b",
    "hada_t1",
    "lokr_w1",
    "lokr_w2_a",
    "lokr_t2",
    "lora_mid.weight",
    "lora_up.weight",
    "lora_down.weight",
    "alpha",
    "dora_scale",
    "diff",
    "diff_b",
    "lora_A.weight",
    "lora.up.weight",
    "lora_magnitude_vector",
]
_CACHE: dict = {}


def _source(index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if index not in _CACHE:
        with safe_open(str(SOURCES[index]), "pt") as handle:
            _CACHE[index] = (load_file(SOURCES[index]), dict(handle.metadata() or {}))
    tensors, metadata = _CACHE[index]
    return dict(tensors), dict(metadata)


_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)
_mutation = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 10**6)),
    st.tuples(st.just("reshape"), st.integers(0, 10**6), _shapes),
    st.tuples(st.just("rename"), st.integers(0, 10**6), st.sampled_from(PARTS)),
    st.tuples(st.just("add"), st.integers(0, 10**6), st.sampled_from(PARTS), _shapes),
    st.tuples(st.just("value"), st.integers(0, 10**6), st.sampled_from([0.0, -1.0, 1e30])),
    st.tuples(
        st.just("metadata"),
        st.sampled_from(["ss_network_args", "lora_adapter_metadata", "ss_base_model_version"]),
        st.sampled_from(
            [
                '{"algo": "dylora", "block_size": "3"}',
                "{",
                '{"unet.r": "x"}',
                "[]",
                "sdxl",
                '{"unet.rank_pattern": 3}',
                '{"algo": "loha"}',
            ]
        ),
    ),
)


def _mutate(tensors: dict, metadata: dict, mutation: tuple) -> None:
    keys = sorted(tensors)
    kind = mutation[0]
    if kind == "metadata":
        metadata[mutation[1]] = mutation[2]
        return
    key = keys[mutation[1] % len(keys)]
    if kind == "drop":
        del tensors[key]
    elif kind == "reshape":
        tensors[key] = torch.ones(mutation[2])
    elif kind == "rename":
        tensors[f"{key.split('.', 1)[0]}.{mutation[2]}"] = tensors.pop(key)
    elif kind == "add":
        tensors[f"{key.split('.', 1)[0]}.{mutation[2]}"] = torch.ones(mutation[3])
    else:
        tensors[key] = torch.full_like(tensors[key], mutation[2])


def test_fuzzed_sd_adapters_raise_only_loramerge_errors(tmp_path):
    counts = {"accepted": 0, "refused": 0}

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        index=st.integers(0, len(SOURCES) - 1),
        mutations=st.lists(_mutation, min_size=1, max_size=3),
    )
    def run(index, mutations):
        tensors, metadata = _source(index)
        for mutation in mutations:
            if tensors:
                _mutate(tensors, metadata, mutation)
        path = tmp_path / "fuzzed.safetensors"
        path.unlink(missing_ok=True)
        save_file(tensors, path, metadata=metadata)
        try:
            adapter = read_adapter(path)
            check_adapter(adapter)
            for module in adapter.modules.values():
                lora_b, lora_a = module.factors()
                assert lora_b.shape[1] == lora_a.shape[0] == module.r
        except LoramergeError:
            counts["refused"] += 1
            return
        counts["accepted"] += 1

    run()
    assert counts["accepted"] >= 20 and counts["refused"] >= 50, counts


def test_garbled_diffusers_metadata_is_refused_as_such(tmp_path):
    tensors, metadata = _source(len(SOURCES) - 1)
    for garbage in ("{", "[]", '{"unet.r": "x"}', '{"unet": 4}', json.dumps({"unet.r": 10**400})):
        path = tmp_path / "pytorch_lora_weights.safetensors"
        path.unlink(missing_ok=True)
        save_file(tensors, path, metadata={**metadata, "lora_adapter_metadata": garbage})
        try:
            read_adapter(path)
        except LoramergeError as exc:
            assert str(path) in str(exc)
