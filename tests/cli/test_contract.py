"""The command line's contract, item by item, as a new user meets it: the version, pipes that
close early, -q, help that shows flags as flags, exit statuses, inputs checked before anything
is written, output names that fit their format, hub repo ids, destinations that cannot be
written."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    ADAPTERS,
    BASES,
    FIXTURES,
    assert_one_error,
    assert_usage_error,
    console_script,
    kohya_dylora_with_unit,
)
from safetensors.torch import save_file

LORA = ADAPTERS / "llama-lora"
BASE = BASES / "llama"
TEXT = FIXTURES / "text" / "eval.txt"
RESLORA = FIXTURES / "reslora" / "bs"


def _run_script(*args: object, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(console_script()), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def _nothing_at(out: Path) -> None:
    assert not out.exists() and not out.is_symlink()
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, leftovers


# ---------------------------------------------------------------- --version


def test_version_alone_prints_the_version_and_exits_0(cli):
    from loramerge import __version__

    result = cli("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"loramerge {__version__}\n"
    done = _run_script("--version")
    assert done.returncode == 0 and done.stdout == f"loramerge {__version__}\n", done.stderr


# ---------------------------------------------------------------- pipes


def _many_module_adapter(folder: Path, modules: int = 1500) -> Path:
    """A PEFT adapter with many tiny modules: `inspect` prints far more than a pipe holds."""
    folder.mkdir()
    tensors = {}
    for i in range(modules):
        stem = f"base_model.model.model.layers.{i}.mlp.down_proj"
        tensors[f"{stem}.lora_A.weight"] = torch.full((1, 4), 0.5)
        tensors[f"{stem}.lora_B.weight"] = torch.full((4, 1), 0.25)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["down_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_output_into_a_pipe_that_closes_early_exits_0_quietly(tmp_path):
    """`loramerge inspect X | head -1`: the reader leaves after one line; the installed
    command exits 0 and says nothing about a broken pipe."""
    adapter = _many_module_adapter(tmp_path / "many")
    script = f"'{console_script()}' inspect '{adapter}' 2>'{tmp_path / 'err'}' | head -1; "
    script += "echo status=${PIPESTATUS[0]}"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[-1] == "status=0", done.stdout
    assert (tmp_path / "err").read_text() == ""


# ---------------------------------------------------------------- -q


def test_quiet_silences_tables_and_summaries(cli, tmp_path):
    result = cli("inspect", LORA, "--base", BASE, "-q")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    result = cli("convert", LORA, "--to", "kohya", "-o", tmp_path / "k.safetensors", "-q")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    # --json still prints what it was asked for
    result = cli("inspect", LORA, "-q", "--json")
    assert json.loads(result.stdout)["format"] == "peft"


def test_quiet_keeps_warnings_and_errors_on_stderr(cli, tmp_path):
    unit2 = kohya_dylora_with_unit(tmp_path, 2)
    result = cli("truncate", unit2, "--rank", "3", "-o", tmp_path / "r3.safetensors", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("warning: ") and "DyLoRA unit 2" in result.stderr
    result = cli("inspect", tmp_path / "missing", "-q")
    assert result.exit_code == 1 and result.stderr.startswith("error: ")


# ---------------------------------------------------------------- --help


def _commands() -> list[str]:
    from loramerge_cli.app import COMMANDS

    return list(COMMANDS)


@pytest.mark.parametrize("command", _commands())
def test_help_shows_flags_as_flags(cli, command):
    result = cli(command, "--help")
    assert result.exit_code == 0, result.output
    usage = result.output.splitlines()[0]
    assert usage.startswith(f"Usage: loramerge {command} [OPTIONS]"), usage
    assert "{" not in usage and "}" not in usage, usage
    assert "<bool>" not in result.output
    for flag in ("--force", "--json", "--quiet", "--debug", "--help"):
        lines = [line.strip() for line in result.output.splitlines() if flag in line]
        if flag in ("--force",) and not lines:
            continue  # commands that write nothing take no --force
        first = lines[0].removeprefix("-q, ")
        assert first.startswith(flag + "  "), first  # the flag, then its help: no value


def test_root_help_and_usage(cli):
    result = cli("--help")
    assert result.exit_code == 0 and "--version" in result.output
    assert "<bool>" not in result.output


# ---------------------------------------------------------------- exit statuses


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("merge", LORA, "-o", "x"), ("Missing option '--base'",)),
        (("merge", LORA, "--base", BASE, "-o", "x", "--nope"), ("--nope",)),
        (("frobnicate",), ("frobnicate",)),
        (("merge", LORA, "--base", BASE, "-o", "x", "--dtype", "int8"), ("'--dtype int8'",)),
        (("convert", LORA, "--to", "onnx", "-o", "x"), ("'--to onnx'", "peft, kohya, gguf")),
        (("inspect", LORA, "--format", "zip"), ("'--format zip'",)),
        (("merge", LORA, "--base", BASE, "-o", "x", "--max-shard-size", "2"), ("needs a unit",)),
        (("truncate", LORA, "--rank", "4", "--energy", "0.5", "-o", "x"), ("--energy",)),
    ],
    ids=[
        "missing-option",
        "unknown-option",
        "unknown-command",
        "bad-choice-library",
        "bad-format-name",
        "bad-input-format",
        "size-without-unit",
        "exclusive-options",
    ],
)
def test_usage_errors_exit_2(cli, tmp_path, args, needles):
    result = cli(*args)
    assert_usage_error(result, *needles)


def test_problems_with_inputs_exit_1(cli, tmp_path):
    assert_one_error(cli("inspect", tmp_path / "missing"), "does not exist")
    out = tmp_path / "out"
    out.mkdir()
    assert_one_error(cli("merge", LORA, "--base", BASE, "-o", out), "already exists", "--force")


def test_readme_states_the_exit_statuses():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Exit status") :]
    for code in ("`0`", "`1`", "`2`", "`130`"):
        assert code in section, code


# ---------------------------------------------------------------- inputs before outputs


@pytest.mark.parametrize(
    "args",
    [
        ("reslora", RESLORA, "--base", BASE, "--check-text", "{missing}"),
        ("reslora", FIXTURES / "reslora" / "ms", "--base", BASE, "--stats", "{missing}"),
        ("reslora-stats", RESLORA, "--base", BASE, "--text", "{missing}"),
        ("merge", LORA, "--base", "{missing}"),
        ("convert", LORA, "--to", "peft", "--base", "{missing}"),
        ("truncate", LORA, "--rank", "2", "--base", "{missing}"),
        ("fold", FIXTURES / "cola", "--base", "{missing}"),
        ("reslora", RESLORA, "--base", "{missing}"),
    ],
    ids=[
        "reslora-check-text",
        "reslora-stats-file",
        "reslora-stats-text",
        "merge-base",
        "convert-base",
        "truncate-base",
        "fold-base",
        "reslora-base",
    ],
)
def test_every_input_an_option_names_is_checked_before_writing(cli, tmp_path, args):
    missing = tmp_path / "missing.txt"
    out = tmp_path / "out"
    line = [str(missing) if arg == "{missing}" else arg for arg in args]
    result = cli(*line, "-o", out)
    assert_one_error(result, str(missing))
    _nothing_at(out)


# ---------------------------------------------------------------- output names


@pytest.mark.parametrize(
    ("args", "out", "needles"),
    [
        (("convert", LORA, "--to", "gguf", "--base", BASE), "x.safetensors", (".gguf",)),
        (("convert", LORA, "--to", "kohya"), "x.gguf", (".safetensors", "x.gguf")),
        (("convert", LORA, "--to", "kohya"), "x", ("x.safetensors",)),
        (("convert", LORA, "--to", "peft"), "x.safetensors", ("folder", "'x'")),
        (("convert", LORA, "--engine", "vllm"), "x.safetensors", ("folder",)),
        (("merge", LORA, "--base", BASE), "x.safetensors", ("a model", "folder")),
        (("truncate", LORA, "--rank", "2,4"), "x.safetensors", ("folder",)),
        (("fold", FIXTURES / "cola", "--as-lora"), "x.gguf", ("folder",)),
        (("reslora", RESLORA, "--base", BASE), "x.safetensors", ("folder",)),
    ],
    ids=[
        "gguf-as-safetensors",
        "kohya-as-gguf",
        "kohya-without-suffix",
        "peft-folder-as-file",
        "engine-folder-as-file",
        "model-folder-as-file",
        "ranks-folder-as-file",
        "fold-adapter-as-file",
        "reslora-folder-as-file",
    ],
)
def test_output_names_that_contradict_the_format_are_refused(cli, tmp_path, args, out, needles):
    target = tmp_path / out
    result = cli(*args, "-o", target)
    assert_usage_error(result, "'--out", *needles)
    _nothing_at(target)


# ---------------------------------------------------------------- saved embedding tables


TIED = ADAPTERS / "llama-tied-embedding"
TIED_BASE = BASES / "llama-tied"


def _changed_table(tmp_path: Path) -> Path:
    from loramerge.formats.peft import read
    from loramerge.formats.peft_writer import write

    adapter = read(TIED)
    name, table = next(iter(adapter.base_tables.items()))
    from loramerge.adapter import LazyTensor

    changed = table.load().clone()
    changed[3] += 0.125
    adapter.base_tables[name] = LazyTensor.of(changed)
    folder = tmp_path / "changed-table"
    folder.mkdir()
    write(adapter, folder)
    return folder


def test_vllm_says_the_saved_tables_match_the_base_only_after_comparing(cli, tmp_path):
    out = tmp_path / "vllm"
    result = cli("convert", TIED, "--engine", "vllm", "--base", TIED_BASE, "-o", out)
    assert result.exit_code == 0, result.output
    assert "compared with the base: equal" in result.stderr
    unchecked = cli("convert", TIED, "--engine", "vllm", "-o", tmp_path / "unchecked")
    assert unchecked.exit_code == 0, unchecked.output
    assert "were not compared with the base" in unchecked.stderr and "--base" in unchecked.stderr
    assert "equal" not in unchecked.stderr


def test_vllm_refuses_saved_tables_that_differ_from_the_base(cli, tmp_path):
    changed = _changed_table(tmp_path)
    out = tmp_path / "vllm"
    result = cli("convert", changed, "--engine", "vllm", "--base", TIED_BASE, "-o", out)
    assert_one_error(result, "vLLM cannot serve saved base_layer embedding tables", "differ")
    _nothing_at(out)


def test_verify_compares_a_one_sided_saved_table_with_the_base(cli, tmp_path):
    from loramerge.formats.peft import read
    from loramerge.formats.peft_writer import write

    changed = _changed_table(tmp_path)
    adapter = read(changed)
    adapter.base_tables = {}
    without = tmp_path / "without-table"
    without.mkdir()
    write(adapter, without)
    result = cli("verify", changed, without, "--base", TIED_BASE)
    assert_one_error(result, "base table")
    # the fixture's own table equals the base's: the same comparison passes
    adapter = read(TIED)
    adapter.base_tables = {}
    plain = tmp_path / "plain"
    plain.mkdir()
    write(adapter, plain)
    assert cli("verify", TIED, plain, "--base", TIED_BASE).exit_code == 0


# ---------------------------------------------------------------- hub repo ids


def _fake_hub(tmp_path: Path, monkeypatch, repos: dict[str, Path]) -> Path:
    """A huggingface-hub cache holding `repos` (repo id -> folder or file), and no network."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    for repo, source in repos.items():
        root = cache / f"models--{repo.replace('/', '--')}"
        revision = "0" * 40
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(revision)
        snapshot = root / "snapshots" / revision
        if source.is_dir():
            shutil.copytree(source, snapshot)
        else:
            snapshot.mkdir(parents=True)
            shutil.copy(source, snapshot / source.name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_adapter_and_checkpoint_arguments_take_hub_repo_ids(cli, tmp_path, monkeypatch):
    repos = {
        "org/lora": LORA,
        "org/base": BASE,
        "org/reslora": RESLORA,
        "org/cola-1": FIXTURES / "cola" / "link-1",
    }
    _fake_hub(tmp_path, monkeypatch, repos)
    result = cli("inspect", "org/lora", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["module_count"] == 28
    merged = tmp_path / "merged"
    assert cli("merge", "org/lora", "--base", "org/base", "-o", merged, "-q").exit_code == 0
    assert (merged / "config.json").exists()
    assert cli("verify", "org/lora", LORA).exit_code == 0
    out = tmp_path / "k.safetensors"
    assert cli("convert", "org/lora", "--to", "kohya", "-o", out, "-q").exit_code == 0
    assert cli("truncate", "org/lora", "--rank", "2", "-o", tmp_path / "t", "-q").exit_code == 0
    result = cli("reslora", "org/reslora", "--base", "org/base", "-o", tmp_path / "r", "-q")
    assert result.exit_code == 0, result.output
    result = cli("fold", "org/cola-1", "--as-lora", "-o", tmp_path / "f", "-q")
    assert result.exit_code == 0, result.output
    result = cli("inspect", "org/not-cached")
    assert_one_error(result, "org/not-cached", "not a cached or reachable hub repo")


# ---------------------------------------------------------------- verify --text without peft


def test_verify_text_works_without_peft(tmp_path):
    """A plain install has no peft: `verify --text` with an adapter runs loramerge's own
    forward. peft is made unimportable in a fresh process."""
    kohya = FIXTURES / "kohya" / "llama-lora.safetensors"
    argv = ["loramerge", "verify", str(LORA), str(kohya), "--base", str(BASE), "--text"]
    argv += [str(TEXT), "--json"]
    script = (
        "import sys\n"
        "sys.modules['peft'] = None\n"
        "from loramerge_cli.app import main\n"
        f"sys.argv = {argv!r}\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] and report["mode"] == "logits"


# ---------------------------------------------------------------- progress


def test_inspect_with_a_base_reports_progress_in_bytes(tmp_path):
    from loramerge.jobs.inspect import inspect

    seen: list[tuple[int, int]] = []
    inspect(LORA, BASE, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] > 0
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_inspect_with_a_base_draws_a_progress_bar_on_a_terminal(cli, monkeypatch):
    import io

    from loramerge_cli import common
    from rich.console import Console

    captured = io.StringIO()
    terminal = Console(file=captured, force_terminal=True, width=100)
    monkeypatch.setattr(common, "stderr", terminal)
    assert cli("inspect", LORA, "--base", BASE).exit_code == 0
    assert "reading the base" in captured.getvalue()


# ---------------------------------------------------------------- destinations


def test_out_dot_with_force_names_the_destination_and_the_cause(cli, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = cli("convert", LORA, "--to", "peft", "-o", ".", "--force")
    assert_one_error(result, "error: .:", "the folder you are working in", "new folder")
    assert list(work.iterdir()) == []


def test_read_only_destination_names_the_destination_and_the_cause(cli, tmp_path, monkeypatch):
    """A destination the system will not write (read-only or not permitted) is one line
    naming OUT and the cause."""
    from pathlib import Path as PathType

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_mkdir = PathType.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == readonly:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(PathType, "mkdir", mkdir)
    out = readonly / "adapter"
    result = cli("convert", LORA, "--to", "peft", "-o", out)
    assert_one_error(result, str(out), "Read-only file system", "cannot be written in")
    assert list(readonly.iterdir()) == []


def test_full_disk_during_a_gguf_write_names_the_destination_and_the_cause(tmp_path):
    """A size limit stands for a full disk: writes past it fail (EFBIG) as ENOSPC would."""
    out = tmp_path / "adapter.gguf"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    done = _run_script("convert", LORA, "--to", "gguf", "--base", BASE, "-o", out, preexec_fn=limit)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: writing failed"), done.stderr
    assert "File too large" in lines[0] and "nothing was written" in lines[0]
    _nothing_at(out)
