"""Session-wide guards: no test may change a byte of the shipped fixtures, no command may change
a byte of its inputs or print a traceback for a user error."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import FIXTURES, tree_hashes
from hypothesis import settings

OUT_OPTIONS = ("-o", "--out")
# the architecture answers loramerge keeps between runs: in a folder of this session's own (the
# commands run in-process and in child processes alike), never the user's cache
os.environ["LORAMERGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="loramerge-test-cache-")
atexit.register(shutil.rmtree, os.environ["LORAMERGE_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def fixtures_untouched():
    before = tree_hashes(FIXTURES)
    yield
    after = tree_hashes(FIXTURES)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests changed input files: {changed[:10]}"


def split_paths(args: list[str]) -> tuple[list[Path], list[Path]]:
    """(existing paths among the arguments, output paths given after -o/--out)."""
    inputs: list[Path] = []
    outs: list[Path] = []
    after_out = False
    for arg in args:
        if after_out:
            outs.append(Path(arg))
            after_out = False
        elif arg in OUT_OPTIONS:
            after_out = True
        elif arg.startswith("--out="):
            outs.append(Path(arg.removeprefix("--out=")))
        elif not arg.startswith("-"):
            try:
                if Path(arg).exists():
                    inputs.append(Path(arg))
            except (OSError, ValueError):  # not a path at all (too long, NUL byte)
                continue
    return inputs, outs


def _is_output(path: Path, outs: list[Path]) -> bool:
    """Inside an output, or one of its temporary siblings (.OUT.loramerge-*)."""
    resolved = path.resolve()
    for out in outs:
        target = out.resolve()
        if resolved == target or target in resolved.parents:
            return True
        for parent in (resolved, *resolved.parents):
            if parent.parent == target.parent and parent.name.startswith(f".{target.name}."):
                return True
    return False


def input_hashes(args: list[str]) -> dict[Path, str]:
    """sha256 of every file under every input path argument, outputs excluded."""
    inputs, outs = split_paths(args)
    hashes: dict[Path, str] = {}
    for root in inputs:
        # regular files only: reading a FIFO given as an input would block
        files = [root] if not root.is_dir() else list(root.rglob("*"))
        files = [p for p in files if p.is_file()]
        for path in files:
            if "__pycache__" in path.parts or _is_output(path, outs):
                continue
            hashes[path.resolve()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


@pytest.fixture
def cli():
    """Run the Typer app in-process; returns the CliRunner result.

    Every file under every path argument (outputs excluded) is hashed before and after the
    command and must be byte-identical; without --debug, no exception other than the CLI's own
    exit may escape (a user error prints one `error:` line, never a traceback).
    """
    from loramerge_cli.app import app
    from typer.testing import CliRunner

    runner = CliRunner()

    def run(*args: str):
        argv = [str(a) for a in args]
        before = input_hashes(argv)
        result = runner.invoke(app, argv)
        after = {path: digest for path, digest in input_hashes(argv).items() if path in before}
        changed = sorted(str(p) for p in before if after.get(p) != before[p])
        assert not changed, f"`loramerge {' '.join(argv)}` changed its inputs: {changed[:5]}"
        if "--debug" not in argv and result.exception is not None:
            assert isinstance(result.exception, SystemExit), (
                f"`loramerge {' '.join(argv)}` raised {result.exception!r} (a traceback)"
            )
            assert "Traceback (most recent call last)" not in result.output
        return result

    return run


# Hypothesis draws the same examples on every run (derandomize) so that CI cannot fail on an
# example nobody has seen; HYPOTHESIS_PROFILE=explore searches afresh.
settings.register_profile("loramerge", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "loramerge"))
