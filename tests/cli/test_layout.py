"""Packaging, layering and code rules: the library never loads the terminal libraries nor spells
command-line flags, every option it names is a real flag, functions fit on a screen."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import ADAPTERS, BASES, console_script


def _modules_after(code: str) -> set[str]:
    script = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_library_does_not_import_typer_or_rich():
    loaded = _modules_after(
        "import loramerge.jobs.merge, loramerge.jobs.inspect, loramerge.jobs.convert, "
        "loramerge.formats.registry"
    )
    assert "typer" not in loaded
    assert "rich" not in loaded


def test_help_does_not_import_torch():
    loaded = _modules_after("from loramerge_cli.app import app")
    # `torch` is the command line's stand-in (loramerge_cli.lazy_torch); torch itself is not
    assert "torch._C" not in loaded


def test_no_top_level_cli_module_is_installed():
    import importlib.util

    spec = importlib.util.find_spec("loramerge_cli")
    assert spec is not None
    assert importlib.util.find_spec("cli") is None or "loramerge" not in str(
        importlib.util.find_spec("cli").origin
    )


def test_console_script_runs():
    out = subprocess.run([str(console_script()), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "merge" in out.stdout


def _buffered_env() -> dict[str, str]:
    """The environment without PYTHONUNBUFFERED: a piped stdout is then block-buffered, so
    output a process does not flush before it ends is lost."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def test_console_script_leaves_with_its_output_complete(tmp_path):
    """The console script ends the process without interpreter teardown: what it printed into
    a pipe (block-buffered) must still arrive whole, and the merged folder be complete."""
    out = tmp_path / "merged"
    command = ["merge", ADAPTERS / "llama-lora", "--base", BASES / "llama", "-o", out, "--json"]
    done = subprocess.run(
        [str(console_script()), *map(str, command)],
        env=_buffered_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["out"] == str(out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(summary["shards"])
    assert (out / "config.json").exists()


def test_console_script_keeps_exit_status_and_atexit_hooks(tmp_path):
    marker = tmp_path / "hook-ran"
    script = (
        "import atexit, pathlib, sys\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
        "atexit.register(print, 'printed by a hook')\n"
        "from loramerge_cli.app import main\n"
        f"sys.argv = ['loramerge', 'inspect', {str(tmp_path / 'missing')!r}]\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=_buffered_env(), capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: ")
    assert marker.read_text() == "yes"
    assert done.stdout == "printed by a hook\n"  # stdout is a pipe: it arrives only if flushed


def test_exit_status_follows_sys_exit():
    from loramerge_cli.app import _exit_status

    assert _exit_status(None) == 0
    assert _exit_status(3) == 3
    assert _exit_status("bye") == 1


# ---------------------------------------------------------------- code rules

ROOT = Path(__file__).resolve().parents[2]
# Rewritten for issue 18 at the time of issue 19, and held to these rules once that lands.
PENDING: set[str] = set()
MAX_LINES = 60


def _sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants that are not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            docstrings.add(id(first.value))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    ]


def test_no_function_is_longer_than_sixty_lines():
    """A function reads in one screen. A command's option list is declarative and does not
    count: lines are counted from the first statement of the body."""
    long = []
    for path in _sources("loramerge", "cli"):
        name = str(path.relative_to(ROOT))
        if name in PENDING:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.body[0].lineno + 2
                if lines > MAX_LINES:
                    long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_library_spells_no_command_line_flags():
    """Messages name options with opt("id"); the command line adds the flags."""
    flag = re.compile(r"(^|[\s(`'\"])--[a-z]")
    found = []
    for path in _sources("loramerge"):
        for node in _strings(ast.parse(path.read_text())):
            if flag.search(node.value):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:60]!r}")
    assert not found, found


# the option-check helpers of loramerge.jobs.options: which positional arguments are ids
_ID_ARGUMENTS = {
    "exclusive": (0, 2),
    "needs": (0, 2),
    "check_choice": (2,),
    "check_rank": (1,),
    "check_count": (1,),
    "check_share": (1,),
    "check_tolerance": (1,),
}


def _option_ids() -> set[str]:
    ids = set()
    for path in _sources("loramerge"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name == "opt" and node.args and isinstance(node.args[0], ast.Constant):
                ids.add(node.args[0].value)
            ids.update(
                keyword.value.value
                for keyword in node.keywords
                if keyword.arg == "option"
                and isinstance(keyword.value, ast.Constant)
                and isinstance(keyword.value.value, str)
            )
            for index in _ID_ARGUMENTS.get(name, ()):
                if index < len(node.args) and isinstance(node.args[index], ast.Constant):
                    ids.add(node.args[index].value)
    return ids


def test_every_option_the_library_names_is_a_flag_of_the_command_line():
    import typer.main
    from loramerge_cli.app import app
    from loramerge_cli.errors import flag

    group = typer.main.get_command(app)
    flags = {
        opt for command in group.commands.values() for param in command.params for opt in param.opts
    }
    ids = _option_ids()
    assert {"rank", "base", "dtype", "force", "stats", "max_shard_size"} <= ids
    missing = sorted(f"{option} -> {flag(option)}" for option in ids if flag(option) not in flags)
    assert not missing, missing
