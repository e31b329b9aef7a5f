"""Packaging and layering rules: the library never loads the terminal libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    assert "torch" not in loaded


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
