"""Safe loading: what loramerge refuses to trust, fuzzed readers, read-only inputs, determinism."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import ADAPTERS, BASES, FIXTURES, ROOT, tree_hashes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loramerge.errors import FormatError, LoramergeError
from loramerge.formats.common import load_pickle_weights
from loramerge.io.json_files import read_json
from loramerge.io.safetensors_header import DTYPES, read_header
from loramerge.io.safetensors_reader import SafetensorsReader
from loramerge.model.folder import open_base

PACKAGE_DIRS = [ROOT / "loramerge", ROOT / "cli"]
KOHYA = FIXTURES / "kohya" / "llama-lora.safetensors"


def _file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


# --- safetensors headers: what the basic header tests do not reach ---------------------------


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("header", "message"),
    [
        (
            b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            "'t' twice",
        ),
        (
            b'{"t":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}',
            "not valid JSON",
        ),
        (b'{"t":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}', "unknown dtype"),
        (b'{"t":{"dtype":{"a":1},"shape":[1],"data_offsets":[0,4]}}', "unknown dtype"),
        (b'{"t":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', "shape"),
        (b'{"t":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', "shape"),
        (b'{"t":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', "shape"),
        # 2**40 x 2**40 floats: the product must not wrap around to a small number
        (
            b'{"t":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}}',
            "needs 4835703278458516698824704 bytes",
        ),
        (b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', "two increasing"),
        (b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}', "two increasing"),
        (b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}', "two increasing"),
        (b'{"t":[1,2]}', "not an object"),
        (b'{"__metadata__":[]}', "__metadata__"),
        (b'{"__metadata__":{"a":{"b":"c"}}}', "__metadata__"),
        (b'["t"]', "not a JSON object"),
        (b"", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_header_refusals(tmp_path, header, message):
    path = _file(tmp_path / "bad.safetensors", header, b"\0" * 4)
    with pytest.raises(FormatError, match=re.escape(message)) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_header_length_prefix_is_checked_before_reading(tmp_path):
    for claimed, message in ((2**64 - 1, "100 MB limit"), (100_000_001, "100 MB limit")):
        path = tmp_path / "x.safetensors"
        path.write_bytes(struct.pack("<Q", claimed) + b"{}")
        with pytest.raises(FormatError, match=message):
            read_header(path)


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    # a FIFO with no writer would block a plain open(); the reader must answer at once
    worker = threading.Thread(target=lambda: result.append(_raises(read_header, fifo)))
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert isinstance(result[0], FormatError) and "regular file" in str(result[0])
    with pytest.raises(FormatError, match="is a folder"):
        read_header(tmp_path)
    with pytest.raises(FormatError, match="not found"):
        read_header(tmp_path / "missing.safetensors")


def _raises(function, *args) -> BaseException | None:
    try:
        function(*args)
    except BaseException as exc:
        return exc
    return None


def test_row_ranges_outside_a_tensor_are_refused(tmp_path):
    save_file({"a": torch.arange(12.0).reshape(4, 3)}, tmp_path / "x.safetensors")
    with SafetensorsReader(tmp_path / "x.safetensors") as reader:
        assert reader.read("a", (1, 3)).tolist() == [[3, 4, 5], [6, 7, 8]]
        for rows in ((3, 5), (-1, 2), (2, 1)):
            with pytest.raises(IndexError):
                reader.read("a", rows)


# --- safetensors files on disk, fuzzed: nothing but FormatError, no read outside the file ---


class RecordingReader(SafetensorsReader):
    """A reader that checks every byte range it reads lies inside the file."""

    def read_bytes(self, offset: int, length: int) -> torch.Tensor:
        size = os.fstat(self.fd).st_size
        assert offset >= 0 and offset + length <= size, (offset, length, size)
        data = super().read_bytes(offset, length)
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            assert data.numpy().tobytes() == handle.read(length)
        return data


@st.composite
def safetensors_files(draw) -> tuple[bytes, list[tuple[str, int, int]]]:
    """Mostly-valid files: a correct layout, then maybe one mutation of header or data."""
    count = draw(st.integers(0, 4))
    names = draw(
        st.lists(st.text(min_size=1, max_size=4), min_size=count, max_size=count, unique=True)
    )
    header: dict[str, object] = {}
    position = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
        position += size
    data = draw(st.binary(min_size=position, max_size=position))
    mutation = draw(st.sampled_from(["none", "offset", "shape", "cut", "extra", "dtype", "len"]))
    if names and mutation in ("offset", "shape", "dtype"):
        entry = header[draw(st.sampled_from(names))]
        if mutation == "offset":
            entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-9, 9))
        elif mutation == "shape":
            entry["shape"] = draw(st.lists(st.integers(-1, 2**62), max_size=3))
        else:
            entry["dtype"] = draw(st.sampled_from(["F32", "I8", "F4", "", "f32"]))
    if mutation == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    if mutation == "extra":
        data += draw(st.binary(min_size=1, max_size=9))
    raw = json.dumps(header).encode()
    raw += b" " * draw(st.integers(0, 7))
    length = len(raw) + (draw(st.integers(-3, 3)) if mutation == "len" else 0)
    return struct.pack("<Q", max(length, 0)) + raw + data, names


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scratch")


@pytest.mark.oracle
def test_fuzzed_files_read_only_inside_themselves(scratch):
    """Every byte range the reader asks for lies inside the file and holds the file's bytes;
    counts what the fuzzer reached, so the check cannot silently exercise refusals only."""
    counts = {"files": 0, "accepted": 0, "tensors read": 0}

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=safetensors_files(), data=st.data())
    def run(case, data):
        content, _ = case
        path = scratch / "fuzz.safetensors"
        path.write_bytes(content)
        counts["files"] += 1
        try:
            reader = RecordingReader(path)
        except FormatError:
            return
        counts["accepted"] += 1
        with reader:
            for name, entry in reader.header.entries.items():
                value = reader.read(name)
                assert tuple(value.shape) == entry.shape
                counts["tensors read"] += 1
                if entry.shape:
                    stop = data.draw(st.integers(0, entry.shape[0]))
                    start = data.draw(st.integers(0, stop))
                    assert reader.read(name, (start, stop)).shape[0] == stop - start

    run()
    assert counts["files"] >= 300 and counts["accepted"] >= 60, counts
    assert counts["tensors read"] >= 100, counts


# --- pickle: only torch.load(weights_only=True), refusals say why, nothing runs -------------


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["zip", "legacy", "raw"])
def test_pickle_that_runs_code_is_refused_and_never_executed(tmp_path, layout):
    marker = tmp_path / "executed"
    payload = {"w": torch.zeros(2), "x": _RunsCode(marker)}
    path = tmp_path / "adapter_model.bin"
    if layout == "raw":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=layout == "zip")
    with pytest.raises(FormatError) as info:
        load_pickle_weights(path)
    message = str(info.value)
    assert str(path) in message and "refused" in message
    assert "weights_only=True" in message and "never runs code" in message
    assert not marker.exists()


def test_plain_pickled_adapter_still_loads(tmp_path):
    """The positive control: a state dict of tensors is read, equal to the safetensors one."""
    folder = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "llama-lora", folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    loaded = load_pickle_weights(folder / "adapter_model.bin")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_garbage_pickles_are_format_errors(tmp_path):
    for name, content in {
        "random.bin": bytes(range(256)) * 4,
        "zip.bin": b"PK\x03\x04" + bytes(60),
        "list.bin": pickle.dumps([1, 2, 3]),
        "empty.bin": b"",
    }.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(FormatError) as info:
            load_pickle_weights(path)
        assert str(path) in str(info.value)


def _python_sources() -> list[Path]:
    return sorted(p for folder in PACKAGE_DIRS for p in folder.rglob("*.py"))


def test_package_never_trusts_remote_code_or_unsafe_pickle():
    bad = []
    for path in _python_sources():
        text = path.read_text()
        for pattern in (
            r"trust_remote_code\s*=\s*True",
            r"weights_only\s*=\s*False",
            r"\bpickle\.loads?\(",
            r"\bdill\b",
            r"(?<![\w.])(eval|exec)\(",
            r"safe_globals|add_safe_globals",
        ):
            bad += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start() : text.find(")", text.find("weights_only", match.start()))]
            if "weights_only=True" not in call[:400]:
                bad.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert not bad, bad


# --- index entries and links ------------------------------------------------------------


def _index_with(base: Path, shard: str) -> None:
    path = base / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = next(iter(index["weight_map"].values()))
    index["weight_map"] = {k: (shard if v == first else v) for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ("sub/../../x.safetensors", "leaves the model folder"),
        ("/etc/passwd", "leaves the model folder"),
        ("a\u0000b", "leaves the model folder"),
        ("", "leaves the model folder"),
        ("loop.safetensors", "leaves the model folder"),
    ],
)
def test_index_shards_must_stay_in_the_folder(tmp_path, shard, message):
    base = tmp_path / "base"
    shutil.copytree(BASES / "llama", base)
    (base / "loop.safetensors").symlink_to(base / "loop.safetensors")
    _index_with(base, shard)
    with pytest.raises(FormatError, match=message) as info:
        open_base(base)
    assert str(base / "model.safetensors.index.json") in str(info.value)


def test_hub_cache_snapshots_may_link_into_their_blob_store(tmp_path):
    """huggingface-hub's cache keeps files in blobs/ and links to them from snapshots/<rev>/."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, source in enumerate(sorted((BASES / "llama").iterdir())):
        blob = repo / "blobs" / f"blob{index}"
        shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(Path("../..") / "blobs" / blob.name)
    base = open_base(snapshot)
    assert len(base.shard_names) == 3
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(BASES / "llama" / base.shard_names[0], outside)
    (snapshot / base.shard_names[0]).unlink()
    (snapshot / base.shard_names[0]).symlink_to(outside)
    with pytest.raises(FormatError, match="links outside"):
        open_base(snapshot)


# --- JSON configs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"r": 8, "r": 4}', "'r' twice"),
        ('{"a": {"b": 1, "b": 2}}', "'b' twice"),
        ('{"r": ' + "7" * 5000 + "}", "not valid JSON"),
        ("[" * 50_000 + "]" * 50_000, "not valid JSON"),
        ("\udcff", "not valid JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_config_refusals(tmp_path, content, message):
    path = tmp_path / "adapter_config.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(FormatError, match=re.escape(message)):
        read_json(path)
    with pytest.raises(FormatError, match="is a folder"):
        read_json(tmp_path)


# --- adapter configs, fuzzed beside real tensors ----------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_numbers = st.sampled_from([0, 1, 4, 8, 12, 16, 8.0, 7.5, -8, 1e308, "8", True, 10**400]) | _json
_patterns = st.sampled_from(
    [
        "q_proj",
        "v_proj",
        "down_proj",
        "layers.1.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        ".*",
        "(",
        "a{99999999999}",
        "q_proj|v_proj",
        "",
        "[",
        "\\",
    ]
) | st.text(max_size=8)
_configs = st.fixed_dictionaries(
    {},
    optional={
        "r": _numbers,
        "lora_alpha": _numbers,
        "rank_pattern": st.dictionaries(_patterns, _numbers, max_size=3) | _json,
        "alpha_pattern": st.dictionaries(_patterns, _numbers, max_size=3) | _json,
        "use_rslora": _json,
        "fan_in_fan_out": _json,
        "target_modules": _json,
        "peft_type": st.sampled_from(["LORA", "lora", "LOHA", "ADALORA"]) | _json,
        "task_type": _json,
        "base_model_name_or_path": _json,
        "modules_to_save": _json,
        "use_dora": _json,
        "trainable_token_indices": _json,
        "bias": _json,
    },
)


@pytest.fixture(scope="module")
def fuzz_adapter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "adapter"
    folder.mkdir()
    # ranks differ per module (q_proj 4, layers.1 down_proj 12, the rest 8): patterns matter
    shutil.copyfile(
        ADAPTERS / "llama-rslora-patterns" / "adapter_model.safetensors",
        folder / "adapter_model.safetensors",
    )
    return folder


_VALID = json.loads((ADAPTERS / "llama-rslora-patterns" / "adapter_config.json").read_text())


def _mutated(changes: dict, removed: set[str]) -> dict:
    """The fixture's real config with some keys replaced or removed: mostly near-valid."""
    config = {k: v for k, v in _VALID.items() if k not in removed}
    config.update(changes)
    return config


_near_valid = st.builds(_mutated, _configs, st.sets(st.sampled_from(sorted(_VALID)), max_size=3))


def test_fuzzed_adapter_configs_raise_only_loramerge_errors(fuzz_adapter):
    """Configs (mostly the fixture's real one with keys replaced or removed) beside real
    tensors: reading, checking, planning a merge and writing configs back either succeed with
    sane scales or raise loramerge's own error. The fuzzer must reach accepted configs, not only
    refusals: the unmodified config plans a merge of all 28 modules, and some mutated ones too."""
    from loramerge.adapter_checks import check_adapter
    from loramerge.formats import kohya_writer
    from loramerge.formats.peft_config import config_for
    from loramerge.formats.registry import read_adapter
    from loramerge.jobs.merge import preview_merge

    counts = {"runs": 0, "accepted": 0, "accepted mutated": 0}

    def attempt(config, fmt) -> bool:
        counts["runs"] += 1
        text = json.dumps(config, allow_nan=True)
        (fuzz_adapter / "adapter_config.json").write_text(text)
        try:
            adapter = read_adapter(fuzz_adapter, fmt)
            check_adapter(adapter)
            plan = preview_merge(adapter, BASES / "llama")
            written = config_for(adapter)
            json.loads(json.dumps(written, allow_nan=False))
            assert all(isinstance(v, str) for v in kohya_writer.metadata_for(adapter).values())
        except LoramergeError:
            return False
        assert isinstance(config, dict)
        assert plan.counts()["merge"] == len(adapter.modules)
        for module in adapter.modules.values():
            assert module.r >= 1 and math.isfinite(module.scale) and module.scale > 0
        counts["accepted"] += 1
        return True

    assert attempt(_VALID, None)
    assert len(read_adapter(fuzz_adapter).modules) == 28

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(config=_near_valid | _configs | _json, fmt=st.sampled_from([None, "peft"]))
    def run(config, fmt):
        if attempt(config, fmt) and config != _VALID:
            counts["accepted mutated"] += 1

    run()
    assert counts["runs"] >= 300 and counts["accepted mutated"] >= 10, counts


def test_fuzzed_kohya_alphas_raise_only_loramerge_errors(scratch):
    """Any alpha tensor (NaN, inf, negative, zero, odd shapes) on a real kohya file: read and
    checked, or refused with loramerge's own error; accepted alphas are finite and positive.
    The fuzzer must reach both."""
    from loramerge.adapter_checks import check_adapter
    from loramerge.formats.registry import read_adapter

    tensors = load_file(KOHYA)
    name = "lora_te_model_layers_0_self_attn_q_proj.alpha"
    counts = {"accepted": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        alpha=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3)),
        shape=st.lists(st.integers(0, 3), max_size=2),
    )
    def run(alpha, shape):
        path = scratch / "alpha.safetensors"
        save_file({**tensors, name: torch.full(shape, float(alpha), dtype=torch.float64)}, path)
        try:
            adapter = read_adapter(path)
            check_adapter(adapter)
        except LoramergeError:
            counts["refused"] += 1
            return
        module = adapter.modules["model.layers.0.self_attn.q_proj"]
        assert math.isfinite(module.alpha) and module.alpha > 0
        counts["accepted"] += 1

    run()
    assert counts["accepted"] >= 10 and counts["refused"] >= 50, counts


# --- inputs are opened read-only --------------------------------------------------------

_WATCH: dict[str, object] = {"roots": None, "writes": []}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(event: str, args: tuple) -> None:
    roots = _WATCH["roots"]
    if roots is None or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path, mode, flags = args
    writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
        mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
    )
    if writes:
        resolved = Path(os.fsdecode(path)).resolve()
        if any(resolved == root or root in resolved.parents for root in roots):
            _WATCH["writes"].append(str(resolved))


@pytest.fixture
def write_watch():
    if not getattr(sys, "_loramerge_audit", False):
        sys.addaudithook(_audit)  # hooks cannot be removed: it stays idle between tests
        sys._loramerge_audit = True

    def watch(*roots: Path) -> None:
        _WATCH["roots"] = [Path(r).resolve() for r in roots]
        _WATCH["writes"] = []

    yield watch
    _WATCH["roots"] = None


def test_commands_never_open_an_input_for_writing(cli, tmp_path, write_watch):
    adapter, base = ADAPTERS / "llama-lora", BASES / "llama"
    write_watch(adapter, base, KOHYA)
    runs = [
        ("merge", adapter, "--base", base, "-o", tmp_path / "merged", "-q"),
        ("inspect", adapter, "--base", base),
        ("convert", adapter, "--to", "kohya", "-o", tmp_path / "k.safetensors", "--base", base),
        ("convert", KOHYA, "--to", "peft", "-o", tmp_path / "peft"),
    ]
    for args in runs:
        assert cli(*args).exit_code == 0
    assert _WATCH["writes"] == []
    # the watch itself works: an output folder is seen being written
    write_watch(tmp_path)
    assert cli("convert", adapter, "--to", "peft", "-o", tmp_path / "again").exit_code == 0
    assert _WATCH["writes"]


# --- determinism -------------------------------------------------------------------------


# command lines (split on spaces) run twice; {a}, {b}, {f} are the adapters, bases, fixtures
DETERMINISM = {
    "merge": "merge {a}/llama-lora --base {b}/llama",
    "resharded": "merge {a}/gpt2-dora --base {b}/gpt2 --dtype bfloat16 --max-shard-size 200KB",
    "convert-peft": "convert {a}/llama-rslora-patterns --to peft",
    "convert-kohya": "convert {a}/llama-lora --to kohya",
    "kohya-to-peft": "convert {f}/kohya/llama-lora.safetensors --to peft --base {b}/llama",
    "truncate": "truncate {a}/llama-lora --rank 2,4",
    "fold": "fold {f}/cola --base {b}/llama",
}


@pytest.mark.parametrize("name", sorted(DETERMINISM))
def test_same_inputs_give_byte_identical_outputs(cli, tmp_path, name):
    from loramerge_cli.app import app

    args = DETERMINISM[name].format(a=ADAPTERS, b=BASES, f=FIXTURES).split()
    if args[0] not in {c.name or c.callback.__name__ for c in app.registered_commands}:
        pytest.skip(f"no {args[0]} command")
    suffix = ".safetensors" if "kohya" in args else ""
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / run / f"out{suffix}"
        result = cli(*args, "-o", out, "-q")
        assert result.exit_code == 0, result.output
        outputs.append(out)
    if suffix:
        assert outputs[0].read_bytes() == outputs[1].read_bytes()
        files = [outputs[0]]
    else:
        first, second = tree_hashes(outputs[0]), tree_hashes(outputs[1])
        assert first == second and first
        files = sorted(outputs[0].rglob("*.safetensors"))
        written = ("config.json", "model.safetensors.index.json", "adapter_config.json")
        text = "".join(p.read_text() for n in written for p in outputs[0].rglob(n))
        assert not re.search(r"20\d\d-\d\d-\d\d", text), "a date in the output"
    assert files
    for path in files:
        names = list(read_header(path).entries)
        if path.name == "adapter_model.safetensors" or suffix:
            assert names == sorted(names), "adapter tensors are written in sorted order"
