"""Session-wide guards: no test may change a byte of the shipped fixtures."""

from __future__ import annotations

import pytest
from helpers import FIXTURES, tree_hashes


@pytest.fixture(scope="session", autouse=True)
def fixtures_untouched():
    before = tree_hashes(FIXTURES)
    yield
    after = tree_hashes(FIXTURES)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests changed input files: {changed[:10]}"


@pytest.fixture
def cli():
    """Run the Typer app in-process; returns the CliRunner result."""
    from loramerge_cli.app import app
    from typer.testing import CliRunner

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return run
