"""Packaging and layering rules: the library never loads the terminal libraries."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    script = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_library_does_not_import_typer_or_rich():
    loaded = _modules_after(
        "import loramerge.merge, loramerge.inspect, loramerge.convert, loramerge.formats.registry"
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
    out = subprocess.run(["loramerge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "merge" in out.stdout
