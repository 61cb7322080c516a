"""The top-level `nixcache` command: every subcommand is reachable and documents itself."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from nixcache import __version__
from nixcache.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in SUBCOMMANDS:
        assert f"  {name} " in result.output


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_loads_and_has_help(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: main {name}" in result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_unknown_subcommand_is_a_usage_error():
    result = CliRunner().invoke(main, ["srve"])
    assert result.exit_code == 2
    assert "No such command 'srve'" in result.output
