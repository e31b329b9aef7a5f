"""Every bad input of the corpus (tests/badinputs.py) through every command: exit status 1, one
`error:` line naming the file (and module and shapes where they apply), no traceback, nothing
at OUT and no temporary leftovers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import badinputs
import pytest
from helpers import ADAPTERS, BASES, FIXTURES, assert_usage_error, console_script

RESLORA = FIXTURES / "reslora" / "bs"
DYLORA = FIXTURES / "dylora" / "kohya-dylora.safetensors"


def _registered() -> set[str]:
    from loramerge_cli.app import app

    return {c.name or c.callback.__name__ for c in app.registered_commands}


# Every command that reads an adapter, in the form each takes; `verify` is run with the bad
# input on either side. Commands not registered (yet) are left out rather than failing.
COMMANDS = [
    name
    for name in (
        "merge",
        "inspect",
        "convert",
        "truncate",
        "fold",
        "verify-source",
        "verify-candidate",
    )
    if name.split("-")[0] in _registered()
]
CASES = [(name, command) for name in badinputs.BUILDERS for command in COMMANDS]


def command_line(command: str, case: badinputs.Case, out: Path, *extra: str) -> list[str]:
    """The arguments that run `command` on the case; base-side faults need --base."""
    adapter, good = str(case.adapter), str(case.good)
    base = ["--base", str(case.base)]
    maybe_base = base if case.needs_base else []
    lines = {
        "merge": ["merge", adapter, *base, "-o", str(out)],
        "inspect": ["inspect", adapter, *maybe_base],
        "convert": ["convert", adapter, "--to", "peft", "-o", str(out), *maybe_base],
        "truncate": ["truncate", adapter, "--rank", "4", "-o", str(out), *maybe_base],
        "fold": ["fold", adapter, *base, "-o", str(out)],
        "verify-source": ["verify", adapter, good, *maybe_base],
        "verify-candidate": ["verify", good, adapter, *maybe_base],
    }
    return [*lines[command], *extra]


def assert_one_error_line(output: str, needles: tuple[str, ...]) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in output
    for needle in needles:
        assert needle in line, f"{needle!r} missing from: {line}"
    return line


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() and not out.is_symlink()
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, leftovers


@pytest.mark.parametrize(("name", "command"), CASES)
def test_bad_input_gives_one_clear_error(cli, tmp_path, name, command):
    case = badinputs.build(name, tmp_path / "case")
    out = tmp_path / "outputs" / "out"
    result = cli(*command_line(command, case, out))
    assert result.exit_code == 1, result.output
    assert_one_error_line(result.output, case.needles_for(command.split("-")[0]))
    assert_nothing_written(out)
    if case.marker is not None:
        assert not case.marker.exists(), "loading the input executed code from it"


@pytest.mark.parametrize("name", ["nan-in-adapter", "inf-in-kohya"])
@pytest.mark.parametrize("command", ["merge", "convert"])
def test_allow_nonfinite_accepts_what_was_refused(cli, tmp_path, name, command):
    case = badinputs.build(name, tmp_path / "case")
    assert case.nonfinite
    out = tmp_path / "out"
    result = cli(*command_line(command, case, out, "--allow-nonfinite", "-q"))
    assert result.exit_code == 0, result.output
    assert out.is_dir()
    weights = sorted(out.glob("*.safetensors"))
    assert weights
    from safetensors.torch import load_file

    values = [t for w in weights for t in load_file(w).values() if t.is_floating_point()]
    assert any(not bool(t.isfinite().all()) for t in values), "the non-finite value went missing"


def test_corpus_covers_the_issue():
    """The issue's list of bad inputs, each present in the corpus."""
    wanted = {
        "truncated-safetensors",
        "corrupt-header",
        "invalid-json-config",
        "rank-disagrees",
        "zero-alpha",
        "negative-alpha",
        "nan-in-adapter",
        "another-base",
        "module-base-lacks",
        "empty-adapter",
        "index-missing-shard",
        "unknown-format-folder",
        "pickle-runs-code",
        "index-dotdot",
        "index-absolute",
        "index-symlink-out",
    }
    assert wanted <= set(badinputs.BUILDERS)


@pytest.mark.skipif("reslora" not in _registered(), reason="no reslora command")
@pytest.mark.parametrize(
    "name",
    [n for n in badinputs.BUILDERS if badinputs.BUILDERS[n].__name__.startswith(("index", "base"))],
)
def test_bad_bases_through_reslora(cli, tmp_path, name):
    """A sound ResLoRA checkpoint on each damaged base: the base's fault is reported."""
    case = badinputs.build(name, tmp_path / "case")
    assert case.base_fault
    out = tmp_path / "out"
    result = cli("reslora", RESLORA, "--base", case.base, "-o", out)
    assert result.exit_code == 1, result.output
    assert_one_error_line(result.output, case.needles)
    assert_nothing_written(out)


@pytest.mark.skipif("truncate" not in _registered(), reason="no truncate command")
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ((ADAPTERS / "llama-lora", "--rank", "9"), ("llama-lora", "rank 9", "from 1 to 8")),
        ((ADAPTERS / "llama-lora", "--rank", "4,99"), ("llama-lora", "rank 99", "from 1 to 8")),
        ((DYLORA, "--rank", "12"), (str(DYLORA), "module", "rank 12", "from 1 to 8")),
    ],
    ids=["above-r", "one-of-several", "dylora-above-r"],
)
def test_rank_above_the_adapters(cli, tmp_path, args, needles):
    """A rank the adapter does not have is a problem with the input: exit 1, one line."""
    out = tmp_path / ("out.safetensors" if str(args[0]).endswith(".safetensors") else "out")
    result = cli("truncate", *args, "-o", out)
    assert result.exit_code == 1, result.output
    assert_one_error_line(result.output, needles)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--rank", "0"), ("'--rank 0'", "at least 1")),
        (("--rank", "-3"), ("'--rank -3'", "at least 1")),
        (("--rank", "four"), ("'--rank'", "'four'")),
        (("--energy", "1.5"), ("'--energy 1.5'", "(0, 1]")),
    ],
    ids=["zero", "negative", "word", "energy"],
)
def test_rank_out_of_range_is_a_usage_error(cli, tmp_path, args, needles):
    """A value no input could make right is a usage error: exit 2, Click's message."""
    out = tmp_path / "out"
    result = cli("truncate", ADAPTERS / "llama-lora", *args, "-o", out)
    assert_usage_error(result, *needles)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "args",
    [
        ("fold", FIXTURES / "cola", "--base", BASES / "llama", "--as-lora", "--rank", "0"),
        ("reslora", RESLORA, "--base", BASES / "llama", "--rank", "0"),
    ],
    ids=["fold", "reslora"],
)
def test_other_ranks_out_of_range(cli, tmp_path, args):
    if args[0] not in _registered():
        pytest.skip(f"no {args[0]} command")
    out = tmp_path / "out"
    result = cli(*args, "-o", out)
    assert_usage_error(result, "'--rank 0'", "at least 1")
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("command", "where"),
    [(c, w) for c in ("merge", "inspect", "convert") for w in ("adapter", "base", "out")
     if (c, w) != ("inspect", "out")],
)  # fmt: skip
def test_paths_the_system_refuses(cli, tmp_path, command, where):
    """A path the OS cannot take (a 300-character name) is one error line, not a traceback."""
    too_long = tmp_path / ("x" * 300)
    paths = {"adapter": ADAPTERS / "llama-lora", "base": BASES / "llama", "out": tmp_path / "o"}
    paths[where] = too_long
    if command == "merge":
        args = ["merge", paths["adapter"], "--base", paths["base"], "-o", paths["out"]]
    elif command == "inspect":
        args = ["inspect", paths["adapter"], "--base", paths["base"]]
    else:
        args = ["convert", paths["adapter"], "--to", "peft", "-o", paths["out"]]
        args += ["--base", paths["base"]]
    result = cli(*args)
    assert result.exit_code == 1, result.output
    assert_one_error_line(result.output, (str(too_long), "File name too long"))
    assert not list(tmp_path.glob(".*loramerge-tmp*"))


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("truncated-safetensors", "merge"),
        ("another-base", "convert"),
        ("pickle-calls-eval", "inspect"),
    ],
)
def test_installed_command_prints_no_traceback(tmp_path, name, command):
    """The real console script in a fresh process: stderr is the one error line, stdout empty."""
    case = badinputs.build(name, tmp_path / "case")
    out = tmp_path / "out"
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [str(console_script()), *command_line(command, case, out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert_one_error_line(done.stderr, case.needles)
    assert_nothing_written(out)
    if case.marker is not None:
        assert not case.marker.exists()
